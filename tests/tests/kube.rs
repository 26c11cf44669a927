//! Edge nodes as Kubernetes Nodes, driven with kubectl: real cloud-gw
//! (`run --kubeconfig`), real edge-rt running real containers, and the
//! cluster named by $OUTRIGGER_KUBECONFIG, or else the API server for tests
//! (`outrigger_tests::apiserver`). No controllers run against the test
//! server: where a scheduler would bind a pod, the manifests name the node.

use std::process::Output;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use outrigger_tests::apiserver::Cluster;
use outrigger_tests::cloud::*;
use outrigger_tests::util::*;
use serde_json::Value;

/// Names unique to this run, so a real cluster can be shared.
fn unique(prefix: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() % 1_000_000)
        .unwrap_or(0);
    format!("{prefix}-{n}")
}

fn kubectl(cluster: &Cluster, args: &[&str]) -> Result<Output> {
    Ok(cluster.kubectl().args(args).output()?)
}

/// kubectl that must succeed; its stdout.
fn kc(cluster: &Cluster, args: &[&str]) -> Result<String> {
    let o = kubectl(cluster, args)?;
    ensure!(
        o.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(text(&o))
}

fn kubectl_apply(cluster: &Cluster, yaml: &str) -> Result<String> {
    use std::io::Write;
    let mut child = cluster
        .kubectl()
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("kubectl stdin")?
        .write_all(yaml.as_bytes())?;
    let o = child.wait_with_output()?;
    ensure!(
        o.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(text(&o))
}

fn get_json(cluster: &Cluster, args: &[&str]) -> Result<Value> {
    let mut a = vec!["get"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["-o", "json"]);
    Ok(serde_json::from_str(&kc(cluster, &a)?)?)
}

fn condition<'a>(obj: &'a Value, kind: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

/// A cluster, cloud-gw bridging to it, and an edge joined and running.
struct Setup {
    cluster: Cluster,
    cloud: Cloud,
    node: Node,
    name: String,
    _daemon: Daemon,
}

impl Setup {
    async fn new(labels: &str) -> Result<Setup> {
        let cluster = Cluster::from_env_or_test()?;
        let cloud = Cloud::start_kube(cluster.kubeconfig()).await?;
        let name = unique("edge");
        let node = Node::new()?;
        let mut args = vec!["--labels", labels];
        if labels.is_empty() {
            args.clear();
        }
        let o = join_with(&node, &cloud.server, &cloud.token("10m")?, &name, &args)?;
        ensure!(o.status.success(), "join: {}", stderr(&o));
        let daemon = node.start().await?;
        Ok(Setup {
            cluster,
            cloud,
            node,
            name,
            _daemon: daemon,
        })
    }

    /// A setup whose Node is Ready (and connected).
    async fn ready(labels: &str) -> Result<Setup> {
        let s = Setup::new(labels).await?;
        s.ready_node().await?;
        Ok(s)
    }

    /// Wait (30 s) until the Node is Ready.
    async fn ready_node(&self) -> Result<Value> {
        wait_for("the Node to be Ready", Duration::from_secs(30), || async {
            let n = get_json(&self.cluster, &["node", &self.name]).ok()?;
            let up = |t| condition(&n, t).is_some_and(|c| c["status"] == "True");
            (up("Ready") && up("CloudConnected")).then_some(n)
        })
        .await
        .with_context(|| {
            format!(
                "cloud-gw:\n{}\nedge-rt:\n{}",
                self.cloud.log(),
                self.node.daemon_log()
            )
        })
    }
}

#[tokio::test]
async fn an_edge_that_joins_is_a_ready_node_with_its_labels_capacity_and_lease() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let s = Setup::new("site=plant-7,line=2").await?;
    let n = s.ready_node().await?;
    let labels = &n["metadata"]["labels"];
    for (k, v) in [
        ("node-role.kubernetes.io/edge", ""),
        ("kubernetes.io/hostname", s.name.as_str()),
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
    ensure!(info["architecture"] == "amd64", "nodeInfo: {info}");
    ensure!(
        condition(&n, "CloudConnected").is_some_and(|c| c["status"] == "True"),
        "{}",
        n["status"]["conditions"]
    );
    // kubectl's own table: the node, Ready, its role.
    let table = kc(&s.cluster, &["get", "nodes"])?;
    let row = table
        .lines()
        .find(|l| l.starts_with(&s.name))
        .with_context(|| table.clone())?;
    ensure!(row.contains(" Ready ") && row.contains("edge"), "{table}");
    // The Lease is renewed while connected (every 2 s in this suite).
    let lease = |c: &Cluster| -> Result<String> {
        let l = get_json(c, &["lease", "-n", "kube-node-lease", &s.name])?;
        ensure!(l["spec"]["holderIdentity"] == s.name.as_str(), "{l}");
        Ok(l["spec"]["renewTime"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    };
    let first = lease(&s.cluster)?;
    let renewed = wait_for(
        "the Lease to be renewed",
        Duration::from_secs(10),
        || async { lease(&s.cluster).ok().filter(|t| *t != first) },
    )
    .await?;
    ensure!(renewed > first, "{renewed} <= {first}");
    s.node.cleanup().await
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

fn exec(node: &Node, pod: &str, cmd: &[&str]) -> Result<String> {
    let mut a = vec!["exec", pod, "--"];
    a.extend_from_slice(cmd);
    let o = node.cli(&a)?;
    ensure!(o.status.success(), "exec {cmd:?}: {}", stderr(&o));
    Ok(text(&o))
}

#[tokio::test]
async fn a_pod_applied_with_kubectl_runs_on_the_edge_reports_back_and_is_deleted() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let s = Setup::ready("").await?;
    let pod = unique("app");
    kubectl_apply(&s.cluster, &app(&pod, &s.name))?;
    kubectl_ready(&s, &pod).await?;
    // What the edge reports, through the status subresource.
    let phase = kc(
        &s.cluster,
        &["get", "pod", &pod, "-o", "jsonpath={.status.phase}"],
    )?;
    ensure!(phase == "Running", "phase {phase:?}");
    let p = get_json(&s.cluster, &["pod", &pod])?;
    let cs = &p["status"]["containerStatuses"][0];
    ensure!(
        cs["ready"] == true && cs["state"]["running"].is_object(),
        "{cs}"
    );
    ensure!(p["status"]["hostIP"].is_string(), "{}", p["status"]);
    // The container got the Secret and the ConfigMap.
    ensure!(exec(&s.node, &pod, &["sh", "-c", "echo $TOKEN"])?.trim() == "s3cret");
    ensure!(exec(&s.node, &pod, &["cat", "/cfg/greeting"])?.trim() == "hello");
    // Events as a kubelet's: kubectl describe shows them.
    let described = wait_for(
        "Started in kubectl describe",
        Duration::from_secs(10),
        || async {
            let d = kc(&s.cluster, &["describe", "pod", &pod]).ok()?;
            d.contains("Started").then_some(d)
        },
    )
    .await?;
    ensure!(described.contains(&s.name), "{described}");

    // A ConfigMap update reaches the running container's volume.
    kc(
        &s.cluster,
        &[
            "patch",
            "configmap",
            &format!("{pod}-cfg"),
            "--type=merge",
            "-p",
            r#"{"data":{"greeting":"bonjour"}}"#,
        ],
    )?;
    wait_for(
        "the new ConfigMap in the volume",
        Duration::from_secs(20),
        || async {
            exec(&s.node, &pod, &["cat", "/cfg/greeting"])
                .ok()
                .filter(|g| g.trim() == "bonjour")
        },
    )
    .await?;

    // kubectl delete: the edge stops the container, then the object goes.
    let o = kubectl(&s.cluster, &["delete", "pod", &pod, "--timeout=60s"])?;
    ensure!(
        o.status.success(),
        "kubectl delete: {}\ncloud-gw:\n{}",
        String::from_utf8_lossy(&o.stderr),
        s.cloud.log()
    );
    let gone = kubectl(&s.cluster, &["get", "pod", &pod])?;
    ensure!(!gone.status.success(), "the pod is still there");
    ensure!(
        find(&s.node.pods()?, &pod).is_none(),
        "the pod still runs on the edge"
    );
    ensure!(
        s.cloud.log().contains("deletion completed"),
        "{}",
        s.cloud.log()
    );
    kc(&s.cluster, &["delete", "configmap", &format!("{pod}-cfg")])?;
    kc(&s.cluster, &["delete", "secret", &format!("{pod}-sec")])?;
    s.node.cleanup().await
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

async fn kubectl_ready(s: &Setup, pod: &str) -> Result<()> {
    let o = kubectl(
        &s.cluster,
        &[
            "wait",
            "--for=condition=Ready",
            &format!("pod/{pod}"),
            "--timeout=60s",
        ],
    )?;
    ensure!(
        o.status.success(),
        "kubectl wait {pod}: {}\ncloud-gw:\n{}\nedge-rt:\n{}",
        String::from_utf8_lossy(&o.stderr),
        s.cloud.log(),
        s.node.daemon_log()
    );
    Ok(())
}

/// A cut of the link (TCP hangs): the Lease stops, pods keep running on the
/// edge untouched, and what changed in the cluster meanwhile (a ConfigMap,
/// a new pod, a pod deleted) applies once it is back.
#[tokio::test]
async fn through_a_cut_the_lease_stops_pods_run_on_and_changes_apply_after() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let s = Setup::ready("").await?;
    let a = unique("keep");
    let gone = unique("gone");
    kubectl_apply(&s.cluster, &app(&a, &s.name))?;
    kubectl_apply(&s.cluster, &busybox_pod(&gone, &s.name, ""))?;
    kubectl_ready(&s, &a).await?;
    kubectl_ready(&s, &gone).await?;
    let uid = kc(
        &s.cluster,
        &["get", "pod", &a, "-o", "jsonpath={.metadata.uid}"],
    )?;

    let mut cut = PortCut::cut(s.cloud.addr.port())?;
    wait_for(
        "the edge to see the link down",
        Duration::from_secs(20),
        || async {
            s.node
                .daemon_log()
                .contains("link to cloud-gw down")
                .then_some(())
        },
    )
    .await?;
    s.cloud.logged("silent for two heartbeats").await?;
    // The Lease stops being renewed (every 2 s while connected).
    let renew = || -> Result<String> {
        let l = get_json(&s.cluster, &["lease", "-n", "kube-node-lease", &s.name])?;
        Ok(l["spec"]["renewTime"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    };
    let before = renew()?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    ensure!(renew()? == before, "the Lease was renewed during the cut");

    // Meanwhile in the cluster.
    kc(
        &s.cluster,
        &[
            "patch",
            "configmap",
            &format!("{a}-cfg"),
            "--type=merge",
            "-p",
            r#"{"data":{"greeting":"offline"}}"#,
        ],
    )?;
    let added = unique("added");
    kubectl_apply(&s.cluster, &busybox_pod(&added, &s.name, ""))?;
    kc(&s.cluster, &["delete", "pod", &gone, "--wait=false"])?;
    // On the edge, nothing stops: the deleted pod too runs until the node
    // hears of it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for p in [&a, &gone] {
        let pods = s.node.pods()?;
        let pod = find(&pods, p).with_context(|| format!("{p} gone from the edge"))?;
        ensure!(phase(pod) == "Running", "{p}: {}", phase(pod));
    }

    cut.restore()?;
    kubectl_ready(&s, &added).await?;
    wait_for(
        "the deleted pod stopped and removed",
        Duration::from_secs(60),
        || async {
            let in_cluster = kubectl(&s.cluster, &["get", "pod", &gone])
                .ok()?
                .status
                .success();
            let on_edge = find(&s.node.pods().ok()?, &gone).is_some();
            (!in_cluster && !on_edge).then_some(())
        },
    )
    .await
    .with_context(|| s.cloud.log())?;
    wait_for(
        "the ConfigMap changed during the cut",
        Duration::from_secs(30),
        || async {
            exec(&s.node, &a, &["cat", "/cfg/greeting"])
                .ok()
                .filter(|g| g.trim() == "offline")
        },
    )
    .await?;
    // The pod that lived through the cut was never restarted or replaced.
    ensure!(restarts(&s.node, &a)? == 0, "{a} restarted");
    let uid_after = kc(
        &s.cluster,
        &["get", "pod", &a, "-o", "jsonpath={.metadata.uid}"],
    )?;
    ensure!(uid == uid_after, "{a} was replaced");
    s.ready_node().await?;
    s.node.cleanup().await
}

/// A Deployment pinned to the edge node, with the test as its ReplicaSet
/// controller and scheduler (none runs against the test API server): the
/// pods it makes run, and a rollout replaces them.
#[tokio::test]
async fn a_deployment_for_edge_nodes_runs_and_rolls_out() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let s = Setup::ready("").await?;
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
      nodeSelector: {{node-role.kubernetes.io/edge: ""}}
      terminationGracePeriodSeconds: 2
      containers:
      - name: main
        image: busybox:latest
        imagePullPolicy: Never
        env: [{{name: VERSION, value: "{version}"}}]
        command: ["sh", "-c", "while true; do sleep 1; done"]
"#
        )
    };
    // Plays the controllers: pods from the Deployment's template, bound to
    // the node the scheduler would pick (the only edge node).
    let make_pods = |rev: &str| -> Result<Vec<String>> {
        let dep = get_json(&s.cluster, &["deployment", &d])?;
        let mut names = Vec::new();
        for i in 0..2 {
            let mut pod = dep["spec"]["template"].clone();
            let name = format!("{d}-{rev}-{i}");
            pod["apiVersion"] = "v1".into();
            pod["kind"] = "Pod".into();
            pod["metadata"]["name"] = name.clone().into();
            pod["metadata"]["labels"]["pod-template-hash"] = rev.into();
            pod["spec"]["nodeName"] = s.name.clone().into();
            kubectl_apply(&s.cluster, &serde_json::to_string(&pod)?)?;
            names.push(name);
        }
        Ok(names)
    };
    // On a real cluster its controllers and scheduler do this part.
    let real = s.cluster.is_real();
    let rolled_out = || -> Result<Vec<String>> {
        let o = kubectl(
            &s.cluster,
            &[
                "rollout",
                "status",
                &format!("deployment/{d}"),
                "--timeout=120s",
            ],
        )?;
        ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let names = kc(
            &s.cluster,
            &[
                "get",
                "pods",
                "-l",
                &format!("app={d}"),
                "-o",
                "jsonpath={.items[*].metadata.name}",
            ],
        )?;
        Ok(names.split_whitespace().map(str::to_string).collect())
    };
    kubectl_apply(&s.cluster, &deployment("1"))?;
    let first = if real {
        rolled_out()?
    } else {
        make_pods("r1")?
    };
    let o = kubectl(
        &s.cluster,
        &[
            "wait",
            "--for=condition=Ready",
            "pod",
            "-l",
            &format!("app={d}"),
            "--timeout=60s",
        ],
    )?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for p in &first {
        ensure!(exec(&s.node, p, &["sh", "-c", "echo $VERSION"])?.trim() == "1");
    }
    // The rollout: new template, new pods, old ones deleted.
    kubectl_apply(&s.cluster, &deployment("2"))?;
    let second = if real {
        rolled_out()?
            .into_iter()
            .filter(|p| !first.contains(p))
            .collect()
    } else {
        let second = make_pods("r2")?;
        for p in &first {
            kc(&s.cluster, &["delete", "pod", p, "--wait=false"])?;
        }
        second
    };
    for p in &second {
        kubectl_ready(&s, p).await?;
        ensure!(exec(&s.node, p, &["sh", "-c", "echo $VERSION"])?.trim() == "2");
    }
    wait_for(
        "the old pods gone, in the cluster and on the edge",
        Duration::from_secs(60),
        || async {
            let listed = kc(
                &s.cluster,
                &["get", "pods", "-l", &format!("app={d}"), "-o", "name"],
            )
            .ok()?;
            let on_edge = s.node.pods().ok()?;
            let old_left = first
                .iter()
                .any(|p| listed.contains(p.as_str()) || find(&on_edge, p).is_some());
            (!old_left).then_some(())
        },
    )
    .await?;
    kc(&s.cluster, &["delete", "deployment", &d])?;
    for p in &second {
        kc(&s.cluster, &["delete", "pod", p, "--ignore-not-found"])?;
    }
    s.node.cleanup().await
}

/// Pods for edge nodes created through the admission chain get unbounded
/// unreachable/not-ready tolerations from cloud-gw's webhook; an opted-out
/// pod keeps the defaults. (The test API server calls the webhook as a
/// real one does.)
#[tokio::test]
async fn the_webhook_makes_edge_pods_tolerate_a_lost_node_for_good() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let s = Setup::ready("").await?;
    if s.cluster.is_real() {
        eprintln!(
            "skipped on a real cluster: its webhook configuration is cloud-gw manifests' job"
        );
        return s.node.cleanup().await;
    }
    // Registered without a caBundle, as `cloud-gw manifests` prints it:
    // cloud-gw writes its CA in when it starts.
    kubectl_apply(
        &s.cluster,
        &format!(
            r#"apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {{name: outrigger-cloud-gw}}
webhooks:
- name: edge-autonomy.outrigger.io
  clientConfig: {{url: "https://{}/mutate-pods"}}
  rules: [{{operations: [CREATE], apiGroups: [""], apiVersions: [v1], resources: [pods]}}]
  failurePolicy: Fail
  sideEffects: None
  admissionReviewVersions: [v1]
"#,
            s.cloud.webhook
        ),
    )?;
    let mut s = s;
    s.cloud.restart().await?;
    s.cloud
        .logged("link CA written into the webhook configuration")
        .await?;
    let hook = get_json(
        &s.cluster,
        &["mutatingwebhookconfiguration", "outrigger-cloud-gw"],
    )?;
    use base64::Engine;
    let bundle = base64::engine::general_purpose::STANDARD.decode(
        hook["webhooks"][0]["clientConfig"]["caBundle"]
            .as_str()
            .unwrap_or_default(),
    )?;
    let ca = std::fs::read(s.cloud.dir.path().join("ca.crt"))?;
    ensure!(bundle == ca, "caBundle is not the link CA");
    s.ready_node().await?;
    let edge = unique("tol");
    kubectl_apply(&s.cluster, &busybox_pod(&edge, &s.name, ""))?;
    let p = get_json(&s.cluster, &["pod", &edge])?;
    let tolerations = p["spec"]["tolerations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for key in [
        "node.kubernetes.io/unreachable",
        "node.kubernetes.io/not-ready",
    ] {
        let t = tolerations
            .iter()
            .find(|t| t["key"] == key)
            .with_context(|| format!("no {key} toleration: {tolerations:?}"))?;
        ensure!(
            t["effect"] == "NoExecute" && t.get("tolerationSeconds").is_none(),
            "{t}"
        );
    }
    let out = unique("optout");
    kubectl_apply(
        &s.cluster,
        &busybox_pod(&out, &s.name, "").replace(
            "labels: {app:",
            "annotations: {outrigger.io/autonomy: disabled}, labels: {app:",
        ),
    )?;
    // It keeps what the API server gives every pod: 300 s, then eviction.
    let p = get_json(&s.cluster, &["pod", &out])?;
    let bounded = p["spec"]["tolerations"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|t| t.get("tolerationSeconds").is_some());
    ensure!(bounded, "{}", p["spec"]);
    kc(
        &s.cluster,
        &[
            "delete",
            "mutatingwebhookconfiguration",
            "outrigger-cloud-gw",
        ],
    )?;
    for pod in [&edge, &out] {
        kc(&s.cluster, &["delete", "pod", pod])?;
    }
    // Metrics tell what went on.
    let metrics = http_get(s.cloud.http, "/metrics")?;
    ensure!(
        metrics.contains("outrigger_cloud_connected_nodes 1"),
        "{metrics}"
    );
    ensure!(http_get(s.cloud.http, "/readyz")?.contains("ok"));
    s.node.cleanup().await
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

/// Two replicas racing to start share one CA (made once, in a Secret), and
/// an edge served by one goes on with the other.
#[tokio::test]
async fn two_replicas_share_one_ca_and_an_edge_moves_between_them() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let cluster = Cluster::from_env_or_test()?;
    let secret_name = unique("cloud-gw-pki");
    let secret = format!("default/{secret_name}");
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
    let node = Node::new()?;
    let o = join_with(&node, &one.server, &two.token("10m")?, &name, &[])?;
    ensure!(o.status.success(), "join: {}", stderr(&o));
    let _daemon = node.start().await?;
    let pod = unique("moved");
    kubectl_apply(&cluster, &busybox_pod(&pod, &name, ""))?;
    let ready = |c: &Cluster| {
        kubectl(
            c,
            &[
                "wait",
                "--for=condition=Ready",
                &format!("pod/{pod}"),
                "--timeout=60s",
            ],
        )
    };
    ensure!(ready(&cluster)?.status.success(), "{}", one.log());
    // The first replica goes; the second takes its address (as behind a
    // load balancer) and the edge carries on with it.
    let port = one.addr.port();
    let _ = one.child.kill();
    let _ = one.child.wait();
    drop(two);
    let three = Cloud::start_replica(&k, &secret, Some(port)).await?;
    three.logged("node connected").await?;
    let later = unique("later");
    kubectl_apply(&cluster, &busybox_pod(&later, &name, ""))?;
    let o = kubectl(
        &cluster,
        &[
            "wait",
            "--for=condition=Ready",
            &format!("pod/{later}"),
            "--timeout=60s",
        ],
    )?;
    ensure!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        three.log()
    );
    ensure!(find(&node.pods()?, &pod).is_some_and(|p| phase(p) == "Running"));
    for p in [&pod, &later] {
        kc(&cluster, &["delete", "pod", p])?;
    }
    kc(&cluster, &["delete", "secret", &secret_name])?;
    node.cleanup().await
}

/// With its own certificate, a node asks by name for a Secret its pods use
/// (given) and for one that only another node's pod uses (refused, and
/// logged). The edge link has no way to name anything else.
#[tokio::test]
async fn a_node_asking_for_another_nodes_secret_is_refused() -> Result<()> {
    use outrigger_proto::message::{Message, Sync};
    let cluster = Cluster::from_env_or_test()?;
    let cloud = Cloud::start_kube(cluster.kubeconfig()).await?;
    let name = unique("edge");
    let node = Node::new()?;
    let o = join_with(&node, &cloud.server, &cloud.token("10m")?, &name, &[])?;
    ensure!(o.status.success(), "join: {}", stderr(&o));
    let (mine, theirs) = (unique("mine"), unique("theirs"));
    for (pod, secret, on) in [
        (&mine, &mine, name.as_str()),
        (&theirs, &theirs, "some-other-node"),
    ] {
        kubectl_apply(
            &cluster,
            &format!(
                "apiVersion: v1\nkind: Secret\nmetadata: {{name: {secret}}}\nstringData: {{k: v}}\n---\n{}",
                busybox_pod(pod, on, &format!("  volumes: [{{name: s, secret: {{secretName: {secret}}}}}]\n"))
            ),
        )?;
    }
    let dir = link_dir(&node);
    let tls = edge_rt::link::tls::link_config(
        &std::fs::read(dir.join("ca.crt"))?,
        &std::fs::read(dir.join("node.crt"))?,
        &std::fs::read(dir.join("node.key"))?,
    )?;
    let mut link = edge_rt::link::join::connect(&cloud.server, "/link", tls).await?;
    edge_rt::link::join::hello(&mut link, &name).await?;
    let mut ask = async |id: u64, secret: &str| -> Result<Sync> {
        link.send(&Message::Sync(Sync::Get {
            id,
            kind: "Secret".into(),
            namespace: "default".into(),
            name: secret.into(),
        }))
        .await?;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), link.recv()).await??;
            if let Message::Sync(got @ Sync::Got { .. }) = m {
                return Ok(got);
            }
        }
    };
    // The cache may lag the kubectl apply by a moment.
    let mut given = None;
    for _ in 0..50 {
        if let Sync::Got {
            object: Some(o), ..
        } = ask(1, &mine).await?
        {
            given = Some(o);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(given.is_some(), "its own secret was not given");
    match ask(2, &theirs).await? {
        Sync::Got {
            id: 2,
            object: None,
            refused: Some(r),
        } => {
            ensure!(r.contains("not used by any pod on node"), "{r}")
        }
        other => anyhow::bail!("another node's secret was answered with {other:?}"),
    }
    cloud.logged("not used by any pod on node").await?;
    for p in [&mine, &theirs] {
        kc(
            &cluster,
            &["delete", "pod", p, "--force", "--grace-period=0"],
        )?;
        kc(&cluster, &["delete", "secret", p])?;
    }
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
    let s = Setup::ready("").await?;
    let pod = unique("stubborn");
    kubectl_apply(
        &s.cluster,
        &busybox_pod(&pod, &s.name, "")
            .replace(
                "terminationGracePeriodSeconds: 2",
                "terminationGracePeriodSeconds: 120",
            )
            .replace(
                "while true; do sleep 1; done",
                "trap '' TERM; while true; do sleep 1; done",
            ),
    )?;
    kubectl_ready(&s, &pod).await?;
    // With the pod's 120 s this would time out.
    let o = kubectl(
        &s.cluster,
        &["delete", "pod", &pod, "--grace-period=2", "--timeout=40s"],
    )?;
    ensure!(
        o.status.success(),
        "kubectl delete: {}\ncloud-gw:\n{}\nedge-rt:\n{}",
        String::from_utf8_lossy(&o.stderr),
        s.cloud.log(),
        s.node.daemon_log()
    );
    ensure!(find(&s.node.pods()?, &pod).is_none(), "still on the edge");
    s.node.cleanup().await
}
