//! The cloud link's trust: joining with a token that pins the CA, mutual
//! TLS afterwards, and every way in that must be refused, with the reason
//! clear on the edge and logged on cloud-gw.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use outrigger_tests::cloud::*;
use outrigger_tests::netns::VethNs;
use outrigger_tests::util::*;

#[tokio::test]
async fn a_node_joins_with_a_token_then_links_over_mutual_tls() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let cloud = Cloud::start().await?;
    let node = joined(&cloud, "gw-1")?;
    cloud.logged("node joined").await?;
    let key = std::fs::metadata(link_dir(&node).join("node.key"))?;
    ensure!(
        std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o077 == 0,
        "node.key is readable by others"
    );
    let daemon = node.start().await?;
    cloud_connected(&node).await?;
    cloud.logged("node connected").await?;
    ensure!(cloud.log().contains("\"gw-1\""), "{}", cloud.log());
    drop(daemon);
    node.cleanup().await
}

#[tokio::test]
async fn bad_tokens_a_wrong_pin_and_clients_without_a_node_certificate_are_refused() -> Result<()> {
    let cloud = Cloud::start().await?;
    let node = Node::new()?;
    let good = cloud.token("10m")?;
    let parsed = outrigger_proto::token::JoinToken::parse(&good)?;

    // A wrong secret: the edge is told the token is invalid, not why.
    let mut wrong = parsed.clone();
    wrong.secret = "0000000000000000".into();
    let o = join(&node, &cloud.server, &wrong.to_string(), "gw-x")?;
    ensure!(
        !o.status.success() && stderr(&o).contains("invalid join token"),
        "{}",
        stderr(&o)
    );
    cloud.logged("invalid join token").await?;

    // Expired.
    let short = cloud.token("1s")?;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let o = join(&node, &cloud.server, &short, "gw-x")?;
    ensure!(stderr(&o).contains("expired"), "{}", stderr(&o));
    cloud.logged("expired").await?;

    // Revoked.
    let t = cloud.token("10m")?;
    let id = outrigger_proto::token::JoinToken::parse(&t)?.id;
    Cloud::cmd(cloud.dir.path(), &["token", "revoke", &id])?;
    let o = join(&node, &cloud.server, &t, "gw-x")?;
    ensure!(stderr(&o).contains("revoked"), "{}", stderr(&o));
    cloud.logged("was revoked").await?;

    // A token for another CA: the edge does not even finish TLS.
    let mut other = parsed.clone();
    other.ca_pin = "0".repeat(64);
    let o = join(&node, &cloud.server, &other.to_string(), "gw-x")?;
    ensure!(
        stderr(&o).contains("does not match the token's pin"),
        "{}",
        stderr(&o)
    );
    cloud.logged("TLS handshake failed").await?;
    ensure!(
        !link_dir(&node).join("node.crt").exists(),
        "a refused join left a certificate"
    );

    // Plain TCP.
    {
        use std::io::{Read, Write};
        let addr = cloud.server.trim_start_matches("wss://").to_string();
        let mut s = std::net::TcpStream::connect(&addr)?;
        s.write_all(b"GET /link HTTP/1.1\r\nHost: x\r\n\r\n")?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        ensure!(
            !String::from_utf8_lossy(&buf).contains("101"),
            "plain TCP got an upgrade"
        );
    }
    let before = cloud.log().matches("TLS handshake failed").count();
    ensure!(
        before >= 2,
        "the plain TCP client was not logged:\n{}",
        cloud.log()
    );

    // TLS without a client certificate, on the link endpoint.
    let pinned = std::sync::Arc::new(edge_rt::link::tls::PinnedCa::new(&parsed.ca_pin));
    let r = edge_rt::link::join::connect(
        &cloud.server,
        "/link",
        edge_rt::link::tls::join_config(pinned.clone())?,
    )
    .await;
    let e = r
        .err()
        .context("a client without a certificate got a link")?
        .to_string();
    ensure!(e.contains("a node certificate is required"), "{e}");
    cloud.logged("refused at the WebSocket upgrade").await?;

    // An incompatible protocol version is refused with both versions named.
    let mut link = edge_rt::link::join::connect(
        &cloud.server,
        "/join",
        edge_rt::link::tls::join_config(pinned)?,
    )
    .await?;
    use outrigger_proto::message::{Control, Message};
    link.send(&Message::Control(Control::Hello {
        version: outrigger_proto::Version { major: 9, minor: 0 },
        node: "gw-x".into(),
    }))
    .await?;
    match link.recv().await? {
        Message::Control(Control::Refused { reason }) => {
            let ours = outrigger_proto::VERSION.to_string();
            ensure!(reason.contains("9.0") && reason.contains(&ours), "{reason}")
        }
        m => anyhow::bail!("expected a refusal, got {m:?}"),
    }
    cloud.logged("incompatible link protocol").await?;
    Ok(())
}

#[tokio::test]
async fn a_certificate_of_another_node_is_refused() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let cloud = Cloud::start().await?;
    let node = joined(&cloud, "gw-a")?;
    // The same key and certificate, but the node claims to be gw-b.
    let cfg = link_dir(&node).join("link.toml");
    let text = std::fs::read_to_string(&cfg)?.replace("\"gw-a\"", "\"gw-b\"");
    std::fs::write(&cfg, text)?;
    let daemon = node.start().await?;
    cloud
        .logged("this certificate is node \\\"gw-a\\\"'s, not \\\"gw-b\\\"'s")
        .await?;
    wait_for(
        "the edge to log the refusal",
        Duration::from_secs(10),
        || async { node.daemon_log().contains("cloud-gw refused").then_some(()) },
    )
    .await?;
    drop(daemon);
    node.cleanup().await
}

fn objects_dir(cloud: &Cloud, node: &str) -> PathBuf {
    cloud.dir.path().join("objects").join(node)
}

const APP: &str = "apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data:
  mode: first
  # A calibration table: big enough that a change goes as a patch.
  table: '0000-0001-0002-0003-0004-0005-0006-0007-0008-0009-0010-0011-0012-0013-0014-0015-0016-0017-0018-0019-0020-0021-0022-0023-0024-0025-0026-0027-0028-0029-0030-0031-0032-0033-0034-0035-0036-0037-0038-0039-0040-0041-0042-0043-0044-0045-0046-0047-0048-0049-0050-0051-0052-0053-0054-0055-0056-0057-0058-0059-0060-0061-0062-0063-0064-0065-0066-0067-0068-0069-0070-0071-0072-0073-0074-0075-0076-0077-0078-0079-0080-0081-0082-0083-0084-0085-0086-0087-0088-0089-0090-0091-0092-0093-0094-0095-0096-0097-0098-0099-0100-0101-0102-0103-0104-0105-0106-0107-0108-0109-0110-0111-0112-0113-0114-0115-0116-0117-0118-0119-0120-0121-0122-0123-0124-0125-0126-0127-0128-0129-0130-0131-0132-0133-0134-0135-0136-0137-0138-0139-0140-0141-0142-0143-0144-0145-0146-0147-0148-0149-0150-0151-0152-0153-0154-0155-0156-0157-0158-0159-0160-0161-0162-0163-0164-0165-0166-0167-0168-0169-0170-0171-0172-0173-0174-0175-0176-0177-0178-0179-0180-0181-0182-0183-0184-0185-0186-0187-0188-0189-0190-0191-0192-0193-0194-0195-0196-0197-0198-0199-0200-0201-0202-0203-0204-0205-0206-0207-0208-0209-0210-0211-0212-0213-0214-0215-0216-0217-0218-0219-0220-0221-0222-0223-0224-0225-0226-0227-0228-0229-0230-0231-0232-0233-0234-0235-0236-0237-0238-0239-0240-0241-0242-0243-0244-0245-0246-0247-0248-0249-0250-0251-0252-0253-0254-0255-0256-0257-0258-0259-0260-0261-0262-0263-0264-0265-0266-0267-0268-0269-0270-0271-0272-0273-0274-0275-0276-0277-0278-0279-0280-0281-0282-0283-0284-0285-0286-0287-0288-0289-0290-0291-0292-0293-0294-0295-0296-0297-0298-0299-'
---
apiVersion: v1
kind: Pod
metadata: {name: app}
spec:
  containers:
  - name: main
    image: busybox:latest
    imagePullPolicy: IfNotPresent
    command: [sleep, '3600']
    volumeMounts: [{name: s, mountPath: /etc/settings}]
  volumes: [{name: s, configMap: {name: settings}}]
";

fn second_pod(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  containers:\n  - {{name: main, image: busybox:latest, imagePullPolicy: IfNotPresent, command: [sleep, '3600']}}\n"
    )
}

fn status_files(cloud: &Cloud, node: &str) -> Vec<String> {
    std::fs::read_dir(cloud.dir.path().join("objects/.status").join(node))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn objects_sync_down_status_comes_up_and_a_reconnect_sends_only_the_difference() -> Result<()>
{
    if !require_root() {
        return Ok(());
    }
    let cloud = Cloud::start().await?;
    let node = joined(&cloud, "gw-s")?;
    std::fs::create_dir_all(objects_dir(&cloud, "gw-s"))?;
    std::fs::write(objects_dir(&cloud, "gw-s").join("app.yaml"), APP)?;
    // Another node's objects never reach this one.
    std::fs::create_dir_all(objects_dir(&cloud, "gw-other"))?;
    std::fs::write(
        objects_dir(&cloud, "gw-other").join("x.yaml"),
        second_pod("not-mine"),
    )?;

    let daemon = node.start().await?;
    let p = wait_pod(&node, "app", "the synced pod running", |p| {
        phase(p) == "Running"
    })
    .await?;
    let uid = p.metadata.uid.clone().unwrap_or_default();
    let read = |n: &'static str| {
        let node = &node;
        async move {
            let o = node
                .cli(&["exec", n, "--", "cat", "/etc/settings/mode"])
                .ok()?;
            Some(text(&o).trim().to_string())
        }
    };
    ensure!(read("app").await.as_deref() == Some("first"));
    // Its status reaches the cloud, and the outbox empties behind it.
    wait_for(
        "the pod's status at the cloud",
        Duration::from_secs(15),
        || async {
            status_files(&cloud, "gw-s")
                .iter()
                .any(|s| s.contains(&uid) && s.contains("Running"))
                .then_some(())
        },
    )
    .await?;
    ensure!(!node
        .pods()?
        .iter()
        .any(|p| p.metadata.name.as_deref() == Some("not-mine")));

    // A change on the cloud side reaches the running pod's volume.
    std::fs::write(
        objects_dir(&cloud, "gw-s").join("app.yaml"),
        APP.replace("mode: first", "mode: second"),
    )?;
    wait_for(
        "the changed ConfigMap in the pod",
        Duration::from_secs(30),
        || async { (read("app").await.as_deref() == Some("second")).then_some(()) },
    )
    .await?;

    // Offline: the edge stops; the cloud adds a pod. Back: one change.
    drop(daemon);
    std::fs::write(
        objects_dir(&cloud, "gw-s").join("b.yaml"),
        second_pod("app-b"),
    )?;
    let daemon = node.start().await?;
    wait_pod(&node, "app-b", "the pod added while offline", |p| {
        phase(p) == "Running"
    })
    .await?;
    cloud.logged("objects=2 changes=1").await?;

    // A deletion: the pod stops, and the cloud hears it is gone.
    std::fs::remove_file(objects_dir(&cloud, "gw-s").join("b.yaml"))?;
    wait_for("app-b gone", Duration::from_secs(30), || async {
        let pods = node.pods().ok()?;
        (!pods
            .iter()
            .any(|p| p.metadata.name.as_deref() == Some("app-b")))
        .then_some(())
    })
    .await?;
    wait_for("the deletion reported", Duration::from_secs(15), || async {
        status_files(&cloud, "gw-s")
            .iter()
            .any(|s| s.contains("\"deleted\":true"))
            .then_some(())
    })
    .await
    .with_context(|| {
        format!(
            "edge-rt log:\n{}\ncloud-gw log:\n{}",
            node.daemon_log(),
            cloud.log()
        )
    })?;
    wait_for("an empty outbox", Duration::from_secs(15), || async {
        let o = node.cli(&["store", "stats", "-o", "json"]).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        (v["outbox_status"] == 0 && v["outbox_events"] == 0).then_some(())
    })
    .await?;
    drop(daemon);
    node.cleanup().await
}

/// cloud-gw's own network namespace, joined to ours by a veth pair; a cut
/// drops every packet (TCP hangs, as on a dead cellular link; no resets).
struct CutNet {
    net: VethNs,
    cloud_addr: String,
}

impl CutNet {
    fn new(n: u8) -> Result<CutNet> {
        let net = VethNs::new(
            &format!("ort-cloud-{n}"),
            &format!("ortcl{n}"),
            &format!("10.231.{n}.1/30"),
            &format!("10.231.{n}.2/30"),
        )?;
        Ok(CutNet {
            net,
            cloud_addr: format!("10.231.{n}.2"),
        })
    }

    fn iptables(&self, op: &str) -> Result<()> {
        for chain in ["INPUT", "OUTPUT"] {
            let o = self
                .net
                .exec("iptables")
                .args([op, chain, "-j", "DROP"])
                .output()?;
            ensure!(o.status.success(), "iptables {op} {chain}: {}", stderr(&o));
        }
        Ok(())
    }

    fn cut(&self) -> Result<()> {
        self.iptables("-I")
    }

    fn restore(&self) -> Result<()> {
        self.iptables("-D")
    }
}

/// A 30 s cut that hangs TCP, while the cloud adds, changes and deletes
/// objects and a pod on the node crash-loops: afterwards both sides agree,
/// with nothing lost and nothing applied twice.
#[tokio::test]
async fn after_a_30s_cut_both_sides_converge() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = CutNet::new(7)?;
    let cloud = Cloud::start_in(Some(&net.net.ns), &net.cloud_addr, "90d").await?;
    let node = joined(&cloud, "gw-cut")?;
    let dir = objects_dir(&cloud, "gw-cut");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("app.yaml"), APP)?;
    std::fs::write(dir.join("b.yaml"), second_pod("app-b"))?;
    std::fs::write(
        dir.join("flaky.yaml"),
        manifest("flaky", "sleep 1; exit 1", ""),
    )?;
    let daemon = node.start().await?;
    for p in ["app", "app-b"] {
        wait_pod(&node, p, "running before the cut", |p| {
            phase(p) == "Running"
        })
        .await?;
    }
    let app_uid = node
        .pods()?
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("app"))
        .and_then(|p| p.metadata.uid.clone())
        .unwrap_or_default();

    net.cut()?;
    let t0 = std::time::Instant::now();
    // Both sides notice within two heartbeats (2 s each).
    wait_for(
        "the edge to drop the link",
        Duration::from_secs(15),
        || async {
            node.daemon_log()
                .contains("link to cloud-gw down")
                .then_some(())
        },
    )
    .await?;
    cloud.logged("silent for two heartbeats").await?;
    std::fs::write(
        dir.join("app.yaml"),
        APP.replace("mode: first", "mode: second"),
    )?;
    std::fs::remove_file(dir.join("b.yaml"))?;
    std::fs::write(dir.join("c.yaml"), second_pod("app-c"))?;
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(t0.elapsed())).await;
    let restarts_in_cut = restarts(&node, "flaky")?;
    net.restore()?;

    wait_pod(&node, "app-c", "the pod added during the cut", |p| {
        phase(p) == "Running"
    })
    .await?;
    wait_for(
        "app-b, deleted during the cut, gone",
        Duration::from_secs(60),
        || async {
            let pods = node.pods().ok()?;
            (!pods
                .iter()
                .any(|p| p.metadata.name.as_deref() == Some("app-b")))
            .then_some(())
        },
    )
    .await?;
    wait_for(
        "the ConfigMap changed during the cut",
        Duration::from_secs(60),
        || async {
            let o = node
                .cli(&["exec", "app", "--", "cat", "/etc/settings/mode"])
                .ok()?;
            (text(&o).trim() == "second").then_some(())
        },
    )
    .await?;
    // The cloud knew from the node's cursor what it had (no query), and the
    // changed ConfigMap went as a patch the node applied to its copy.
    cloud.logged("patches=1").await?;
    ensure!(
        !cloud.log().contains("patches without their base"),
        "{}",
        cloud.log()
    );
    let o = node.cli(&["exec", "app", "--", "cat", "/etc/settings/table"])?;
    ensure!(
        text(&o).starts_with("0000-0001-") && text(&o).trim_end().ends_with("0299-"),
        "{}",
        text(&o)
    );
    // The cut's status churn reached the cloud: flaky's restart count, at
    // least the one it had when the link came back.
    wait_for(
        "the cut's status at the cloud",
        Duration::from_secs(30),
        || async {
            status_files(&cloud, "gw-cut")
                .iter()
                .any(|s| {
                    let v: serde_json::Value = serde_json::from_str(s).unwrap_or_default();
                    v["name"] == "flaky"
                        && v["status"]["containerStatuses"][0]["restartCount"]
                            .as_i64()
                            .unwrap_or(-1)
                            >= i64::from(restarts_in_cut)
                })
                .then_some(())
        },
    )
    .await?;
    // Nothing applied twice: the pod that did not change was not touched.
    let app = node
        .pods()?
        .into_iter()
        .find(|p| p.metadata.name.as_deref() == Some("app"))
        .context("app")?;
    ensure!(
        app.metadata.uid.as_deref() == Some(app_uid.as_str()),
        "app was replaced"
    );
    ensure!(restarts(&node, "app")? == 0, "app restarted");
    ensure!(restarts(&node, "app-c")? == 0, "app-c started twice");
    drop(daemon);
    node.cleanup().await
}

/// 100 quick flaps, changes in the middle of them, then a cloud-gw restart
/// while the node is connected: the node ends up with exactly what the
/// cloud has, and the pod nothing changed for is never restarted.
#[tokio::test]
async fn a_hundred_flaps_and_a_cloud_gw_restart() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = CutNet::new(8)?;
    let mut cloud = Cloud::start_in(Some(&net.net.ns), &net.cloud_addr, "90d").await?;
    let node = joined(&cloud, "gw-flap")?;
    let dir = objects_dir(&cloud, "gw-flap");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("app.yaml"), APP)?;
    let daemon = node.start().await?;
    wait_pod(&node, "app", "running", |p| phase(p) == "Running").await?;

    for i in 0..100 {
        net.cut()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        net.restore()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if i == 50 {
            std::fs::write(
                dir.join("app.yaml"),
                APP.replace("mode: first", "mode: second"),
            )?;
            std::fs::write(dir.join("c.yaml"), second_pod("app-c"))?;
        }
    }
    let converge = Duration::from_secs(90);
    wait_for("the pod added during the flaps", converge, || async {
        let pods = node.pods().ok()?;
        pods.iter()
            .any(|p| p.metadata.name.as_deref() == Some("app-c") && phase(p) == "Running")
            .then_some(())
    })
    .await
    .with_context(|| node.daemon_log())?;
    wait_for(
        "the ConfigMap changed during the flaps",
        converge,
        || async {
            let o = node
                .cli(&["exec", "app", "--", "cat", "/etc/settings/mode"])
                .ok()?;
            (text(&o).trim() == "second").then_some(())
        },
    )
    .await?;

    // cloud-gw restarts under a connected node; a pod added meanwhile arrives.
    let connected = cloud.log().matches("node connected").count();
    let _ = cloud.child.kill();
    let _ = cloud.child.wait();
    std::fs::write(dir.join("d.yaml"), second_pod("app-d"))?;
    cloud.restart().await?;
    wait_for("the node back after the restart", converge, || async {
        (cloud.log().matches("node connected").count() > connected).then_some(())
    })
    .await?;
    wait_pod(
        &node,
        "app-d",
        "the pod added while cloud-gw was down",
        |p| phase(p) == "Running",
    )
    .await?;
    ensure!(restarts(&node, "app")? == 0, "app restarted");
    ensure!(restarts(&node, "app-c")? == 0, "app-c started twice");
    drop(daemon);
    node.cleanup().await
}

/// Node certificates of 45 s: the renewal falls due during a cut, happens
/// over the link once it is back, and after the old certificate expired
/// the node still connects, with the new one.
#[tokio::test]
async fn a_certificate_rotates_across_a_cut() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = CutNet::new(9)?;
    let cloud = Cloud::start_in(Some(&net.net.ns), &net.cloud_addr, "45s").await?;
    let node = joined(&cloud, "gw-rot")?;
    let t0 = std::time::Instant::now();
    let first = std::fs::read(link_dir(&node).join("node.crt"))?;
    let daemon = node.start().await?;
    cloud_connected(&node).await?;

    // Cut from 20 s to 33 s: renewal falls due at about 30 s.
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(t0.elapsed())).await;
    net.cut()?;
    tokio::time::sleep(Duration::from_secs(33).saturating_sub(t0.elapsed())).await;
    ensure!(
        std::fs::read(link_dir(&node).join("node.crt"))? == first,
        "renewed before it was due"
    );
    net.restore()?;
    wait_for(
        "the renewal over the restored link",
        Duration::from_secs(30),
        || async {
            node.daemon_log()
                .contains("node certificate renewed")
                .then_some(())
        },
    )
    .await?;
    ensure!(std::fs::read(link_dir(&node).join("node.crt"))? != first);
    cloud.logged("node certificate renewed").await?;

    // Past the first certificate's end, a new connection uses the new one.
    tokio::time::sleep(Duration::from_secs(47).saturating_sub(t0.elapsed())).await;
    let connected = cloud.log().matches("node connected").count();
    net.cut()?;
    wait_for(
        "the edge to drop the link",
        Duration::from_secs(15),
        || async {
            (node.daemon_log().matches("link to cloud-gw down").count() >= 2).then_some(())
        },
    )
    .await?;
    net.restore()?;
    wait_for(
        "a connection with the new certificate",
        Duration::from_secs(60),
        || async { (cloud.log().matches("node connected").count() > connected).then_some(()) },
    )
    .await
    .with_context(|| cloud.log())?;
    drop(daemon);
    node.cleanup().await
}
