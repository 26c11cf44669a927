//! The test API server (tests/src/apiserver) against real clients: kubectl
//! and raw HTTPS. No root needed.

use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use outrigger_tests::apiserver::{Options, TestApiServer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Value};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

enum Auth {
    Cert(String, String),
    Token(String),
    None,
}

/// A raw HTTPS client: one connection per request, so each can fail alone.
struct Client {
    addr: String,
    tls: Arc<rustls::ClientConfig>,
    token: Option<String>,
}

impl Client {
    fn new(s: &TestApiServer, auth: Auth) -> Result<Client> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(s.ca_pem().as_bytes())?)?;
        let b = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let (tls, token) = match auth {
            Auth::Cert(c, k) => (
                b.with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(c.as_bytes())?],
                    PrivateKeyDer::from_pem_slice(k.as_bytes())?,
                )?,
                None,
            ),
            Auth::Token(t) => (b.with_no_client_auth(), Some(t)),
            Auth::None => (b.with_no_client_auth(), None),
        };
        Ok(Client {
            addr: s.url().trim_start_matches("https://").to_string(),
            tls: Arc::new(tls),
            token,
        })
    }

    fn admin(s: &TestApiServer) -> Result<Client> {
        let (c, k) = s.client_cert("test-admin", &["system:masters"])?;
        Client::new(s, Auth::Cert(c, k))
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        ctype: &str,
        body: Vec<u8>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let tcp = tokio::net::TcpStream::connect(&self.addr).await?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(ServerName::try_from("127.0.0.1")?, tcp)
            .await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.addr)
            .header("content-type", ctype)
            .header("user-agent", "apiserver-suite/1");
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        Ok(sender
            .send_request(req.body(Full::new(Bytes::from(body)))?)
            .await?)
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        ctype: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value)> {
        let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let resp = self.send(method, path, ctype, body).await?;
        let code = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((code, v))
    }

    async fn get(&self, path: &str) -> Result<(u16, Value)> {
        self.call("GET", path, "application/json", None).await
    }
    async fn post(&self, path: &str, body: Value) -> Result<(u16, Value)> {
        self.call("POST", path, "application/json", Some(&body))
            .await
    }
    async fn put(&self, path: &str, body: Value) -> Result<(u16, Value)> {
        self.call("PUT", path, "application/json", Some(&body))
            .await
    }
    async fn patch(&self, path: &str, kind: &str, body: Value) -> Result<(u16, Value)> {
        let ct = match kind {
            "merge" => "application/merge-patch+json",
            "json" => "application/json-patch+json",
            "strategic" => "application/strategic-merge-patch+json",
            _ => "application/apply-patch+yaml",
        };
        self.call("PATCH", path, ct, Some(&body)).await
    }
    async fn delete(&self, path: &str, body: Value) -> Result<(u16, Value)> {
        self.call("DELETE", path, "application/json", Some(&body))
            .await
    }

    /// Expect `code`; return the body.
    async fn ok(
        &self,
        r: impl std::future::Future<Output = Result<(u16, Value)>>,
        code: u16,
    ) -> Result<Value> {
        let (c, v) = r.await?;
        if c != code {
            bail!("expected {code}, got {c}: {v}");
        }
        Ok(v)
    }

    async fn watch(&self, path: &str) -> Result<Watch> {
        let resp = self.send("GET", path, "application/json", vec![]).await?;
        if resp.status() != 200 {
            bail!("watch {path}: {}", resp.status());
        }
        Ok(Watch {
            body: resp.into_body(),
            buf: Vec::new(),
        })
    }
}

struct Watch {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
}

impl Watch {
    /// The next event, or None if none comes within `t` (or the stream ends).
    async fn next_within(&mut self, t: Duration) -> Result<Option<Value>> {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Ok(Some(serde_json::from_slice(&line)?));
            }
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => return Ok(None),
                Ok(None) => return Ok(None),
                Ok(Some(f)) => {
                    if let Ok(d) = f?.into_data() {
                        self.buf.extend_from_slice(&d);
                    }
                }
            }
        }
    }

    async fn next(&mut self) -> Result<Value> {
        self.next_within(Duration::from_secs(5))
            .await?
            .context("no watch event within 5 s")
    }

    /// The next event that is not a BOOKMARK.
    async fn next_change(&mut self) -> Result<Value> {
        loop {
            let e = self.next().await?;
            if e["type"] != "BOOKMARK" {
                return Ok(e);
            }
        }
    }
}

fn ev(e: &Value) -> (String, String) {
    (
        e["type"].as_str().unwrap_or_default().to_string(),
        e["object"]["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

fn pair(t: &str, n: &str) -> (String, String) {
    (t.to_string(), n.to_string())
}

fn rv(v: &Value) -> String {
    v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn kubectl_stdin(s: &TestApiServer, args: &[&str], stdin: Option<&str>) -> Result<Output> {
    use std::io::Write;
    use std::process::Stdio;
    let mut cmd = s.kubectl();
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("running kubectl")?;
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(text.as_bytes())?;
    }
    drop(child.stdin.take());
    Ok(child.wait_with_output()?)
}

/// Run kubectl, insisting it succeeds; its stdout.
fn k(s: &TestApiServer, args: &[&str]) -> Result<String> {
    ks(s, args, None)
}

fn ks(s: &TestApiServer, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let o = kubectl_stdin(s, args, stdin)?;
    if !o.status.success() {
        bail!(
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn pod(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "labels": labels},
           "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}})
}

fn cm(name: &str, data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data})
}

const PODS: &str = "/api/v1/namespaces/default/pods";
const CMS: &str = "/api/v1/namespaces/default/configmaps";

#[tokio::test]
async fn authentication_by_certificate_and_token() -> Result<()> {
    let s = TestApiServer::start()?;
    let anon = Client::new(&s, Auth::None)?;
    let (code, st) = anon.get("/api/v1/namespaces").await?;
    assert_eq!(code, 401);
    assert_eq!(st["kind"], "Status");
    assert_eq!(st["reason"], "Unauthorized");
    // /version is public, as kube-apiserver's defaults make it.
    assert_eq!(anon.get("/version").await?.0, 200);

    let bad = Client::new(&s, Auth::Token("nope".into()))?;
    assert_eq!(bad.get("/api/v1/namespaces").await?.0, 401);

    let kc = s.token_kubeconfig("alice", "s3cret-token")?;
    let out = kubectl_as(&kc, &["auth", "whoami", "-o", "json"])?;
    let who: Value = serde_json::from_str(&out)?;
    assert_eq!(who["status"]["userInfo"]["username"], "alice");
    let tok = Client::new(&s, Auth::Token("s3cret-token".into()))?;
    assert_eq!(tok.get("/api/v1/namespaces").await?.0, 200);

    let kc = s.cert_kubeconfig("bob", &["team-a", "team-b"])?;
    let who: Value = serde_json::from_str(&kubectl_as(&kc, &["auth", "whoami", "-o", "json"])?)?;
    assert_eq!(who["status"]["userInfo"]["username"], "bob");
    let groups = who["status"]["userInfo"]["groups"].to_string();
    assert!(
        groups.contains("team-a") && groups.contains("team-b"),
        "{groups}"
    );

    // A certificate from another CA does not get through the handshake.
    let other = TestApiServer::start()?;
    let (c, key) = other.client_cert("mallory", &["system:masters"])?;
    let foreign = Client::new(&s, Auth::Cert(c, key))?;
    assert!(foreign.get("/api/v1/namespaces").await.is_err());

    // The admin kubeconfig is system:masters by certificate.
    let who: Value = serde_json::from_str(&k(&s, &["auth", "whoami", "-o", "json"])?)?;
    assert!(who["status"]["userInfo"]["groups"]
        .to_string()
        .contains("system:masters"));
    Ok(())
}

/// kubectl with another kubeconfig (and its own cache); its stdout.
fn kubectl_as(kubeconfig: &std::path::Path, args: &[&str]) -> Result<String> {
    let o = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(kubeconfig.with_extension("cache"))
        .args(args)
        .output()?;
    if !o.status.success() {
        bail!("kubectl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

#[tokio::test]
async fn discovery_lists_resources_and_errors_are_statuses() -> Result<()> {
    let s = TestApiServer::start()?;
    let c = Client::admin(&s)?;
    let v1 = c.ok(c.get("/api/v1"), 200).await?;
    let pods = v1["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "pods")
        .cloned()
        .context("pods in /api/v1")?;
    assert_eq!(pods["shortNames"], json!(["po"]));
    assert_eq!(pods["categories"], json!(["all"]));
    assert_eq!(pods["namespaced"], true);
    let groups = c.ok(c.get("/apis"), 200).await?;
    assert_eq!(groups["kind"], "APIGroupList");
    let names: Vec<&str> = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|g| g["name"].as_str())
        .collect();
    for g in [
        "apps",
        "coordination.k8s.io",
        "apiextensions.k8s.io",
        "admissionregistration.k8s.io",
    ] {
        assert!(names.contains(&g), "{g} missing from {names:?}");
    }
    let out = k(&s, &["api-resources", "--no-headers"])?;
    assert!(out.lines().any(|l| l.starts_with("leases ")), "{out}");

    let (code, st) = c.get("/api/v1/namespaces/default/pods/nope").await?;
    assert_eq!((code, st["reason"].as_str()), (404, Some("NotFound")));
    assert_eq!(st["details"]["name"], "nope");
    let (code, st) = c.get("/apis/nothing.example/v1/things").await?;
    assert_eq!((code, st["kind"].as_str()), (404, Some("Status")));
    let (code, st) = c
        .call("PUT", PODS, "application/json", Some(&json!({})))
        .await?;
    assert_eq!(
        (code, st["reason"].as_str()),
        (405, Some("MethodNotAllowed"))
    );
    let (code, st) = c.call("POST", CMS, "application/json", None).await?;
    assert_eq!((code, st["reason"].as_str()), (400, Some("BadRequest")));
    Ok(())
}

#[tokio::test]
async fn create_get_update_delete_with_optimistic_concurrency() -> Result<()> {
    let s = TestApiServer::start()?;
    let c = Client::admin(&s)?;
    let created = c.ok(c.post(CMS, cm("a", json!({"k": "v"}))), 201).await?;
    assert!(created["metadata"]["uid"]
        .as_str()
        .is_some_and(|u| u.len() == 36));
    assert!(created["metadata"]["creationTimestamp"].is_string());
    let (code, st) = c.post(CMS, cm("a", json!({}))).await?;
    assert_eq!((code, st["reason"].as_str()), (409, Some("AlreadyExists")));

    let gen = c
        .ok(
            c.post(
                CMS,
                json!({"metadata": {"generateName": "gen-"}, "data": {}}),
            ),
            201,
        )
        .await?;
    let gname = gen["metadata"]["name"].as_str().unwrap();
    assert!(gname.starts_with("gen-") && gname.len() == 9, "{gname}");

    // Update at the current revision works; at the old one it conflicts.
    let mut upd = created.clone();
    upd["data"]["k"] = json!("w");
    let updated = c.ok(c.put(&format!("{CMS}/a"), upd.clone()), 200).await?;
    assert!(rv(&updated).parse::<u64>()? > rv(&created).parse::<u64>()?);
    upd["data"]["k"] = json!("x");
    let (code, st) = c.put(&format!("{CMS}/a"), upd.clone()).await?;
    assert_eq!((code, st["reason"].as_str()), (409, Some("Conflict")));
    // No resourceVersion: unconditional.
    upd["metadata"]["resourceVersion"] = json!("");
    let forced = c.ok(c.put(&format!("{CMS}/a"), upd), 200).await?;
    assert_eq!(forced["data"]["k"], "x");
    // An update that changes nothing keeps the revision.
    let same = c
        .ok(c.put(&format!("{CMS}/a"), forced.clone()), 200)
        .await?;
    assert_eq!(rv(&same), rv(&forced));

    // The namespace must exist; names must be valid.
    let (code, _) = c
        .post("/api/v1/namespaces/nowhere/configmaps", cm("b", json!({})))
        .await?;
    assert_eq!(code, 404);
    let (code, st) = c.post(CMS, cm("Bad_Name", json!({}))).await?;
    assert_eq!((code, st["reason"].as_str()), (422, Some("Invalid")));
    let (code, _) = c
        .post(
            CMS,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}}),
        )
        .await?;
    assert_eq!(code, 400);

    // Preconditions on delete.
    let (code, st) = c
        .delete(
            &format!("{CMS}/a"),
            json!({"preconditions": {"uid": "not-it"}}),
        )
        .await?;
    assert_eq!((code, st["reason"].as_str()), (409, Some("Conflict")));
    c.ok(c.delete(&format!("{CMS}/a"), json!({})), 200).await?;
    assert_eq!(c.get(&format!("{CMS}/a")).await?.0, 404);
    assert_eq!(c.delete(&format!("{CMS}/a"), json!({})).await?.0, 404);

    // Lists: selectors, pages, all namespaces.
    c.ok(
        c.post("/api/v1/namespaces", json!({"metadata": {"name": "other"}})),
        201,
    )
    .await?;
    for i in 0..5 {
        let mut o = cm(&format!("l{i}"), json!({}));
        o["metadata"]["labels"] = json!({"tier": if i % 2 == 0 { "even" } else { "odd" }});
        c.ok(c.post(CMS, o.clone()), 201).await?;
        c.ok(c.post("/api/v1/namespaces/other/configmaps", o), 201)
            .await?;
    }
    let l = c
        .ok(
            c.get(&format!("{CMS}?labelSelector=tier%20in%20(even)")),
            200,
        )
        .await?;
    assert_eq!(l["items"].as_array().unwrap().len(), 3);
    assert_eq!(l["kind"], "ConfigMapList");
    assert!(!rv(&l).is_empty());
    let l = c
        .ok(
            c.get("/api/v1/configmaps?labelSelector=tier!%3Deven,tier"),
            200,
        )
        .await?;
    assert_eq!(l["items"].as_array().unwrap().len(), 4);
    let mut names = vec![];
    let mut next = format!("{CMS}?limit=2&labelSelector=tier");
    loop {
        let page = c.ok(c.get(&next), 200).await?;
        names.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["metadata"]["name"].as_str().unwrap().to_string()),
        );
        match page["metadata"]["continue"].as_str() {
            Some(t) => next = format!("{CMS}?limit=2&labelSelector=tier&continue={t}"),
            None => break,
        }
    }
    assert_eq!(names, ["l0", "l1", "l2", "l3", "l4"]);
    let gone = c
        .ok(
            c.delete(&format!("{CMS}?labelSelector=tier%3Dodd"), json!({})),
            200,
        )
        .await?;
    assert_eq!(gone["items"].as_array().unwrap().len(), 2);
    let l = c
        .ok(c.get(&format!("{CMS}?labelSelector=tier")), 200)
        .await?;
    assert_eq!(l["items"].as_array().unwrap().len(), 3);
    Ok(())
}

#[tokio::test]
async fn patch_types() -> Result<()> {
    let s = TestApiServer::start()?;
    let c = Client::admin(&s)?;
    // Strategic: containers merge by name, env by name, ports by
    // containerPort, `$patch: delete` removes an element.
    let dp = "/apis/apps/v1/namespaces/default/deployments";
    c.ok(c.post(dp, json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}}, "spec": {
            "containers": [
                {"name": "a", "image": "busybox:1", "env": [{"name": "A", "value": "1"}], "ports": [{"containerPort": 80}]},
                {"name": "b", "image": "busybox:2"}]}}}})), 201).await?;
    let v = c
        .ok(
            c.patch(&format!("{dp}/d"), "strategic", json!({"spec": {"template": {"spec": {"containers": [
                {"name": "a", "image": "busybox:3", "env": [{"name": "B", "value": "2"}], "ports": [{"containerPort": 81}]},
                {"name": "b", "$patch": "delete"},
                {"name": "c", "image": "busybox:4"}]}}}})),
            200,
        )
        .await?;
    let cs = &v["spec"]["template"]["spec"]["containers"];
    assert_eq!(cs.as_array().unwrap().len(), 2, "{cs}");
    assert_eq!(
        (cs[0]["name"].as_str(), cs[1]["name"].as_str()),
        (Some("a"), Some("c"))
    );
    assert_eq!(cs[0]["image"], "busybox:3");
    assert_eq!(
        cs[0]["env"],
        json!([{"name": "A", "value": "1"}, {"name": "B", "value": "2"}])
    );
    assert_eq!(cs[0]["ports"].as_array().unwrap().len(), 2);

    // Finalizers merge as a set.
    let mut p = pod("p", json!({"app": "x"}));
    p["metadata"]["finalizers"] = json!(["example.com/one"]);
    c.ok(c.post(PODS, p), 201).await?;
    let path = format!("{PODS}/p");
    let v = c
        .ok(
            c.patch(
                &path,
                "strategic",
                json!({"metadata": {"finalizers": ["example.com/two"]}}),
            ),
            200,
        )
        .await?;
    assert_eq!(
        v["metadata"]["finalizers"],
        json!(["example.com/one", "example.com/two"])
    );
    let v = c
        .ok(
            c.patch(
                &path,
                "strategic",
                json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["example.com/one"],
                "labels": {"app": null, "new": "yes"}}}),
            ),
            200,
        )
        .await?;
    assert_eq!(v["metadata"]["finalizers"], json!(["example.com/two"]));
    assert_eq!(v["metadata"]["labels"], json!({"new": "yes"}));

    // Merge patch replaces lists; null removes.
    let v = c
        .ok(
            c.patch(
                &path,
                "merge",
                json!({"metadata": {"finalizers": null, "annotations": {"a": "b"}}}),
            ),
            200,
        )
        .await?;
    assert!(v["metadata"]["finalizers"].is_null());
    assert_eq!(v["metadata"]["annotations"]["a"], "b");

    // JSON patch with test: a failed test changes nothing.
    let (code, _) = c
        .patch(
            &path,
            "json",
            json!([{"op": "test", "path": "/metadata/annotations/a", "value": "zzz"},
                                    {"op": "add", "path": "/metadata/labels/t", "value": "1"}]),
        )
        .await?;
    assert_eq!(code, 422);
    let v = c
        .ok(c.patch(&path, "json", json!([{"op": "test", "path": "/metadata/annotations/a", "value": "b"},
                                         {"op": "add", "path": "/metadata/labels/t", "value": "1"}])), 200)
        .await?;
    assert_eq!(v["metadata"]["labels"]["t"], "1");
    // Only images may change in a pod's spec.
    let (code, st) = c
        .patch(&path, "merge", json!({"spec": {"restartPolicy": "Never"}}))
        .await?;
    assert_eq!((code, st["reason"].as_str()), (422, Some("Invalid")));

    // Patches of what is not there are 404; apply creates.
    assert_eq!(
        c.patch(&format!("{CMS}/none"), "merge", json!({})).await?.0,
        404
    );
    let applied = c
        .ok(
            c.patch(&format!("{CMS}/made?fieldManager=suite"), "apply",
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "made"}, "data": {"x": "1", "y": "2"}})),
            201,
        )
        .await?;
    assert_eq!(applied["metadata"]["managedFields"][0]["manager"], "suite");
    assert_eq!(
        applied["metadata"]["managedFields"][0]["operation"],
        "Apply"
    );
    // Applying less removes what the manager no longer applies.
    let v = c
        .ok(c.patch(&format!("{CMS}/made?fieldManager=suite"), "apply",
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "made"}, "data": {"x": "1"}})), 200)
        .await?;
    assert_eq!(v["data"], json!({"x": "1"}));
    // Another manager changing x conflicts unless forced.
    let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "made"}, "data": {"x": "2"}});
    let (code, st) = c
        .patch(
            &format!("{CMS}/made?fieldManager=other"),
            "apply",
            body.clone(),
        )
        .await?;
    assert_eq!((code, st["reason"].as_str()), (409, Some("Conflict")));
    assert!(st["message"].as_str().unwrap().contains(".data.x"), "{st}");
    let v = c
        .ok(
            c.patch(
                &format!("{CMS}/made?fieldManager=other&force=true"),
                "apply",
                body,
            ),
            200,
        )
        .await?;
    assert_eq!(v["data"]["x"], "2");
    // Apply needs a field manager.
    assert_eq!(
        c.patch(
            &format!("{CMS}/made"),
            "apply",
            json!({"metadata": {"name": "made"}})
        )
        .await?
        .0,
        400
    );
    Ok(())
}

#[tokio::test]
async fn watch_from_a_revision_sees_exactly_the_later_changes() -> Result<()> {
    let s = TestApiServer::start()?;
    let c = Client::admin(&s)?;
    let a = c.ok(c.post(CMS, cm("a", json!({}))), 201).await?;
    let from = rv(&a);
    c.ok(c.post(CMS, cm("b", json!({}))), 201).await?;
    c.ok(
        c.patch(&format!("{CMS}/a"), "merge", json!({"data": {"x": "1"}})),
        200,
    )
    .await?;
    c.ok(c.delete(&format!("{CMS}/b"), json!({})), 200).await?;
    // Noise elsewhere must not show.
    c.ok(c.post(PODS, pod("p", json!({}))), 201).await?;

    let mut w = c
        .watch(&format!("{CMS}?watch=true&resourceVersion={from}"))
        .await?;
    let got: Vec<_> = [w.next().await?, w.next().await?, w.next().await?]
        .iter()
        .map(ev)
        .collect();
    assert_eq!(
        got,
        [
            pair("ADDED", "b"),
            pair("MODIFIED", "a"),
            pair("DELETED", "b")
        ]
    );
    // Then live changes, and nothing else.
    assert!(w.next_within(Duration::from_millis(300)).await?.is_none());
    c.ok(c.post(CMS, cm("c", json!({}))), 201).await?;
    assert_eq!(ev(&w.next().await?), pair("ADDED", "c"));

    // resourceVersion=0: the current state first, as ADDED.
    let mut w = c.watch(&format!("{CMS}?watch=1&resourceVersion=0")).await?;
    let mut names = vec![ev(&w.next().await?), ev(&w.next().await?)];
    names.sort();
    assert_eq!(names, [pair("ADDED", "a"), pair("ADDED", "c")]);
    assert!(w.next_within(Duration::from_millis(300)).await?.is_none());
    Ok(())
}

#[tokio::test]
async fn watch_selectors_send_deleted_when_objects_leave() -> Result<()> {
    let s = TestApiServer::start()?;
    let c = Client::admin(&s)?;
    let list = c.ok(c.get(PODS), 200).await?;
    let mut w = c
        .watch(&format!(
            "{PODS}?watch=true&resourceVersion={}&labelSelector=app%3Dweb",
            rv(&list)
        ))
        .await?;
    let mut f = c
        .watch(&format!(
            "/api/v1/pods?watch=true&resourceVersion={}&fieldSelector=spec.nodeName%3Dn1",
            rv(&list)
        ))
        .await?;
    c.ok(c.post(PODS, pod("p", json!({"app": "web"}))), 201)
        .await?;
    c.ok(c.post(PODS, pod("q", json!({"app": "db"}))), 201)
        .await?;
    assert_eq!(ev(&w.next().await?), pair("ADDED", "p"));
    c.ok(
        c.patch(
            &format!("{PODS}/p"),
            "merge",
            json!({"metadata": {"labels": {"app": "other"}}}),
        ),
        200,
    )
    .await?;
    let e = w.next().await?;
    assert_eq!(ev(&e), pair("DELETED", "p"));
    c.ok(
        c.patch(
            &format!("{PODS}/q"),
            "merge",
            json!({"metadata": {"labels": {"app": "web"}}}),
        ),
        200,
    )
    .await?;
    assert_eq!(ev(&w.next().await?), pair("ADDED", "q"));
    c.ok(
        c.patch(
            &format!("{PODS}/q"),
            "merge",
            json!({"metadata": {"annotations": {"x": "y"}}}),
        ),
        200,
    )
    .await?;
    assert_eq!(ev(&w.next().await?), pair("MODIFIED", "q"));
    assert!(w.next_within(Duration::from_millis(200)).await?.is_none());

    // Field selectors: binding a pod to n1 brings it into the selection.
    c.ok(
        c.post(
            &format!("{PODS}/p/binding"),
            json!({"apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": "p"}, "target": {"kind": "Node", "name": "n1"}}),
        ),
        201,
    )
    .await?;
    let e = f.next().await?;
    assert_eq!(ev(&e), pair("ADDED", "p"));
    assert_eq!(e["object"]["spec"]["nodeName"], "n1");
    // A second binding conflicts.
    let (code, _) = c
        .post(
            &format!("{PODS}/p/binding"),
            json!({"target": {"name": "n2"}}),
        )
        .await?;
    assert_eq!(code, 409);
    let l = c
        .ok(
            c.get("/api/v1/pods?fieldSelector=spec.nodeName%3Dn1,status.phase%3DPending"),
            200,
        )
        .await?;
    assert_eq!(l["items"].as_array().unwrap().len(), 1);
    let (code, _) = c.get("/api/v1/pods?fieldSelector=spec.unknown%3Dx").await?;
    assert_eq!(code, 400);
    Ok(())
}

#[tokio::test]
async fn old_revisions_are_gone_and_bookmarks_arrive() -> Result<()> {
    let s = TestApiServer::start_with(Options {
        history: 5,
        bookmark_interval: Duration::from_millis(200),
        ..Options::default()
    })?;
    let c = Client::admin(&s)?;
    let first = c.ok(c.post(CMS, cm("a", json!({}))), 201).await?;
    for i in 0..3 {
        c.ok(c.post(CMS, cm(&format!("n{i}"), json!({}))), 201)
            .await?;
    }
    let page = c.ok(c.get(&format!("{CMS}?limit=1")), 200).await?;
    assert_eq!(page["metadata"]["remainingItemCount"], 3);
    // A fresh token still works.
    let tok = page["metadata"]["continue"]
        .as_str()
        .context("continue token")?;
    let page2 = c
        .ok(c.get(&format!("{CMS}?limit=1&continue={tok}")), 200)
        .await?;
    assert_eq!(page2["items"][0]["metadata"]["name"], "n0");
    for i in 0..10 {
        c.ok(
            c.patch(
                &format!("{CMS}/a"),
                "merge",
                json!({"data": {"i": i.to_string()}}),
            ),
            200,
        )
        .await?;
    }
    // Too old for a watch: an ERROR event carrying a 410 Status.
    let mut w = c
        .watch(&format!("{CMS}?watch=true&resourceVersion={}", rv(&first)))
        .await?;
    let e = w.next().await?;
    assert_eq!(e["type"], "ERROR");
    assert_eq!(e["object"]["code"], 410);
    assert_eq!(e["object"]["reason"], "Expired");
    // And for a list continuing from then.
    let tok = page["metadata"]["continue"]
        .as_str()
        .context("continue token")?;
    let (code, st) = c.get(&format!("{CMS}?limit=1&continue={tok}")).await?;
    assert_eq!((code, st["reason"].as_str()), (410, Some("Expired")));

    // Bookmarks carry the current revision.
    let now = c.ok(c.get(CMS), 200).await?;
    let mut w = c
        .watch(&format!(
            "{CMS}?watch=true&allowWatchBookmarks=true&resourceVersion={}",
            rv(&now)
        ))
        .await?;
    let b = w.next().await?;
    assert_eq!(b["type"], "BOOKMARK");
    assert_eq!(rv(&b["object"]), rv(&now));
    c.ok(c.post(CMS, cm("late", json!({}))), 201).await?;
    let e = w.next_change().await?;
    assert_eq!(ev(&e), pair("ADDED", "late"));
    let b = w.next().await?;
    assert_eq!(b["type"], "BOOKMARK");
    assert!(rv(&b["object"]).parse::<u64>()? >= rv(&e["object"]).parse::<u64>()?);

    // sendInitialEvents: the state, then a bookmark marking its end.
    let mut w = c
        .watch(&format!("{CMS}?watch=true&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan"))
        .await?;
    let mut n = 0;
    loop {
        let e = w.next().await?;
        if e["type"] == "BOOKMARK" {
            assert_eq!(
                e["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
                "true"
            );
            break;
        }
        assert_eq!(e["type"], "ADDED");
        n += 1;
    }
    assert_eq!(n, 5);

    // timeoutSeconds ends the stream.
    let mut w = c
        .watch(&format!(
            "{CMS}?watch=true&resourceVersion={}&timeoutSeconds=1",
            rv(&now)
        ))
        .await?;
    let t = std::time::Instant::now();
    while w.next_within(Duration::from_secs(3)).await?.is_some() {}
    assert!(t.elapsed() < Duration::from_millis(2500));
    Ok(())
}

#[tokio::test]
async fn graceful_pod_deletion_and_finalizers() -> Result<()> {
    let s = TestApiServer::start()?;
    let c = Client::admin(&s)?;
    // Unscheduled: deleted at once.
    c.ok(c.post(PODS, pod("loose", json!({}))), 201).await?;
    c.ok(c.delete(&format!("{PODS}/loose"), json!({})), 200)
        .await?;
    assert_eq!(c.get(&format!("{PODS}/loose")).await?.0, 404);

    // On a node: marked, and gone only when the node side says 0.
    let mut p = pod("bound", json!({}));
    p["spec"]["nodeName"] = json!("n1");
    p["spec"]["terminationGracePeriodSeconds"] = json!(20);
    let created = c.ok(c.post(PODS, p), 201).await?;
    let mut w = c
        .watch(&format!(
            "{PODS}?watch=true&resourceVersion={}",
            rv(&created)
        ))
        .await?;
    let v = c
        .ok(c.delete(&format!("{PODS}/bound"), json!({})), 200)
        .await?;
    assert!(v["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(v["metadata"]["deletionGracePeriodSeconds"], 20);
    assert_eq!(ev(&w.next().await?), pair("MODIFIED", "bound"));
    let v = c.ok(c.get(&format!("{PODS}/bound")), 200).await?;
    assert_eq!(v["metadata"]["deletionGracePeriodSeconds"], 20);
    let v = c
        .ok(
            c.delete(&format!("{PODS}/bound"), json!({"gracePeriodSeconds": 5})),
            200,
        )
        .await?;
    assert_eq!(v["metadata"]["deletionGracePeriodSeconds"], 5);
    assert_eq!(ev(&w.next().await?), pair("MODIFIED", "bound"));
    c.ok(
        c.delete(&format!("{PODS}/bound?gracePeriodSeconds=0"), json!({})),
        200,
    )
    .await?;
    assert_eq!(ev(&w.next().await?), pair("DELETED", "bound"));
    assert_eq!(c.get(&format!("{PODS}/bound")).await?.0, 404);

    // Finalizers hold an object until the list is emptied.
    let mut o = cm("held", json!({}));
    o["metadata"]["finalizers"] = json!(["example.com/hold"]);
    c.ok(c.post(CMS, o), 201).await?;
    let v = c
        .ok(c.delete(&format!("{CMS}/held"), json!({})), 200)
        .await?;
    assert!(v["metadata"]["deletionTimestamp"].is_string());
    let v = c.ok(c.get(&format!("{CMS}/held")), 200).await?;
    assert!(v["metadata"]["deletionTimestamp"].is_string());
    // No new finalizers on an object being deleted.
    let (code, _) = c
        .patch(
            &format!("{CMS}/held"),
            "merge",
            json!({"metadata": {"finalizers": ["example.com/hold", "b"]}}),
        )
        .await?;
    assert_eq!(code, 422);
    let mut w = c
        .watch(&format!("{CMS}?watch=true&resourceVersion={}", rv(&v)))
        .await?;
    c.ok(
        c.patch(
            &format!("{CMS}/held"),
            "merge",
            json!({"metadata": {"finalizers": null}}),
        ),
        200,
    )
    .await?;
    assert_eq!(ev(&w.next().await?), pair("DELETED", "held"));
    assert_eq!(c.get(&format!("{CMS}/held")).await?.0, 404);

    // A pod with both: grace 0 leaves it to the finalizer.
    let mut p = pod("both", json!({}));
    p["spec"]["nodeName"] = json!("n1");
    p["metadata"]["finalizers"] = json!(["example.com/x"]);
    c.ok(c.post(PODS, p), 201).await?;
    c.ok(
        c.delete(&format!("{PODS}/both"), json!({"gracePeriodSeconds": 0})),
        200,
    )
    .await?;
    let v = c.ok(c.get(&format!("{PODS}/both")), 200).await?;
    assert_eq!(v["metadata"]["deletionGracePeriodSeconds"], 0);
    c.ok(
        c.patch(
            &format!("{PODS}/both"),
            "json",
            json!([{"op": "remove", "path": "/metadata/finalizers"}]),
        ),
        200,
    )
    .await?;
    assert_eq!(c.get(&format!("{PODS}/both")).await?.0, 404);
    Ok(())
}

#[tokio::test]
async fn status_subresource_is_isolated_and_generation_counts_spec() -> Result<()> {
    let s = TestApiServer::start()?;
    let c = Client::admin(&s)?;
    let p = c.ok(c.post(PODS, pod("p", json!({}))), 201).await?;
    assert_eq!(p["status"]["phase"], "Pending");
    let mut upd = p.clone();
    upd["status"]["phase"] = json!("Running");
    upd["metadata"]["labels"] = json!({"l": "1"});
    let v = c.ok(c.put(&format!("{PODS}/p"), upd), 200).await?;
    assert_eq!(
        v["status"]["phase"], "Pending",
        "main resource ignores status"
    );
    assert_eq!(v["metadata"]["labels"]["l"], "1");
    let v = c
        .ok(c.patch(&format!("{PODS}/p/status"), "merge",
            json!({"metadata": {"labels": {"l": "2"}}, "status": {"phase": "Running", "podIP": "10.0.0.9"}})), 200)
        .await?;
    assert_eq!(v["status"]["phase"], "Running");
    assert_eq!(v["metadata"]["labels"]["l"], "1", "status ignores the rest");
    let mut upd = v.clone();
    upd["status"]["phase"] = json!("Succeeded");
    upd["spec"]["containers"][0]["image"] = json!("busybox:9");
    let v = c.ok(c.put(&format!("{PODS}/p/status"), upd), 200).await?;
    assert_eq!(v["status"]["phase"], "Succeeded");
    assert_eq!(v["spec"]["containers"][0]["image"], "busybox:1.36");

    let d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
        "spec": {"selector": {"matchLabels": {"a": "b"}},
                 "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}}},
        "status": {"replicas": 7}});
    let dp = "/apis/apps/v1/namespaces/default/deployments";
    let v = c.ok(c.post(dp, d), 201).await?;
    assert_eq!(v["metadata"]["generation"], 1);
    assert!(
        v["status"]["replicas"].is_null(),
        "status is not the creator's"
    );
    assert_eq!(v["spec"]["replicas"], 1, "defaulted");
    let v = c
        .ok(
            c.patch(
                &format!("{dp}/d"),
                "merge",
                json!({"metadata": {"labels": {"x": "y"}}}),
            ),
            200,
        )
        .await?;
    assert_eq!(v["metadata"]["generation"], 1);
    let v = c
        .ok(
            c.patch(
                &format!("{dp}/d/status"),
                "merge",
                json!({"status": {"replicas": 3}}),
            ),
            200,
        )
        .await?;
    assert_eq!(v["metadata"]["generation"], 1);
    assert_eq!(v["status"]["replicas"], 3);
    let v = c
        .ok(
            c.patch(
                &format!("{dp}/d"),
                "strategic",
                json!({"spec": {"replicas": 4}}),
            ),
            200,
        )
        .await?;
    assert_eq!(v["metadata"]["generation"], 2);
    assert_eq!(v["status"]["replicas"], 3);
    Ok(())
}

const CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    additionalPrinterColumns:
    - {name: Size, type: integer, jsonPath: .spec.size}
    schema:
      openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
"#;

#[tokio::test]
async fn crds_make_custom_resources_servable() -> Result<()> {
    let s = TestApiServer::start()?;
    let c = Client::admin(&s)?;
    let wp = "/apis/example.com/v1/namespaces/default/widgets";
    assert_eq!(c.get(wp).await?.0, 404);
    ks(&s, &["apply", "-f", "-"], Some(CRD))?;
    k(
        &s,
        &[
            "wait",
            "--for=condition=Established",
            "crd/widgets.example.com",
            "--timeout=5s",
        ],
    )?;
    let disc = c.ok(c.get("/apis/example.com/v1"), 200).await?;
    assert_eq!(disc["resources"][0]["name"], "widgets");
    assert_eq!(disc["resources"][1]["name"], "widgets/status");

    ks(
        &s,
        &["apply", "-f", "-"],
        Some("apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w1}\nspec: {size: 3}\n"),
    )?;
    let out = k(&s, &["get", "wd"])?;
    let mut lines = out.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .split_whitespace()
            .eq(["NAME", "SIZE", "AGE"]),
        "{out}"
    );
    assert!(lines.next().unwrap().starts_with("w1     3"), "{out}");
    let v = c.ok(c.get(&format!("{wp}/w1")), 200).await?;
    assert_eq!(v["metadata"]["generation"], 1);
    // Status through its subresource only; spec changes bump generation.
    let v = c
        .ok(
            c.patch(
                &format!("{wp}/w1"),
                "merge",
                json!({"spec": {"size": 4}, "status": {"ok": true}}),
            ),
            200,
        )
        .await?;
    assert_eq!(v["metadata"]["generation"], 2);
    assert!(v["status"].is_null());
    let v = c
        .ok(
            c.patch(
                &format!("{wp}/w1/status"),
                "merge",
                json!({"status": {"ok": true}}),
            ),
            200,
        )
        .await?;
    assert_eq!(v["status"]["ok"], true);
    // No strategic merge patch for custom resources.
    assert_eq!(
        c.patch(&format!("{wp}/w1"), "strategic", json!({"spec": {}}))
            .await?
            .0,
        415
    );

    k(&s, &["delete", "crd", "widgets.example.com"])?;
    assert_eq!(c.get(wp).await?.0, 404);
    Ok(())
}

#[tokio::test]
async fn kubectl_get_apply_create_patch_describe_delete() -> Result<()> {
    let s = TestApiServer::start()?;
    let pod_yaml = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  labels: {app: web}\nspec:\n  containers:\n  - name: c\n    image: busybox:1.36\n";
    // Plain apply: kubectl validates through the server (fieldValidation).
    let out = ks(&s, &["apply", "-f", "-"], Some(pod_yaml))?;
    assert_eq!(out.trim(), "pod/web created");
    let out = ks(
        &s,
        &["apply", "-f", "-"],
        Some(&pod_yaml.replace("1.36", "1.37")),
    )?;
    assert_eq!(out.trim(), "pod/web configured");
    assert_eq!(
        k(
            &s,
            &[
                "get",
                "pod",
                "web",
                "-o",
                "jsonpath={.spec.containers[0].image}"
            ]
        )?,
        "busybox:1.37"
    );
    // Unknown fields fail strict validation, as with kube-apiserver.
    let o = kubectl_stdin(
        &s,
        &["apply", "-f", "-"],
        Some(&format!("{pod_yaml}  bogus: 1\n")),
    )?;
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("unknown field \"spec.bogus\""),
        "{o:?}"
    );

    let out = k(&s, &["get", "pods"])?;
    let head: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(head, ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]);
    assert!(
        out.lines()
            .nth(1)
            .unwrap()
            .starts_with("web    0/1     Pending"),
        "{out}"
    );
    let out = k(&s, &["get", "pods", "-o", "wide"])?;
    assert!(
        out.lines().next().unwrap().contains("IP       NODE"),
        "{out}"
    );
    let v: Value = serde_json::from_str(&k(&s, &["get", "pod", "web", "-o", "json"])?)?;
    assert_eq!(v["metadata"]["labels"]["app"], "web");
    assert!(k(&s, &["get", "pod", "web", "-o", "yaml"])?.contains("qosClass: BestEffort"));

    ks(&s, &["apply", "-f", "-"], Some("apiVersion: v1\nkind: Node\nmetadata: {name: n1, labels: {node-role.kubernetes.io/edge: \"\"}}\nstatus:\n  conditions: [{type: Ready, status: \"True\"}]\n  nodeInfo: {kubeletVersion: v1.32.0, osImage: x, kernelVersion: k6, containerRuntimeVersion: edge-rt, architecture: arm64, bootID: a, machineID: b, systemUUID: c, kubeProxyVersion: d, operatingSystem: linux}\n"))?;
    let out = k(&s, &["get", "nodes"])?;
    assert!(out
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .eq(["NAME", "STATUS", "ROLES", "AGE", "VERSION"]));
    assert!(
        out.lines()
            .nth(1)
            .unwrap()
            .split_whitespace()
            .take(3)
            .eq(["n1", "Ready", "edge"]),
        "{out}"
    );

    k(
        &s,
        &[
            "create",
            "configmap",
            "cfg",
            "--from-literal=a=1",
            "--from-literal=b=2",
        ],
    )?;
    let out = k(&s, &["get", "cm", "cfg"])?;
    assert!(
        out.lines()
            .nth(1)
            .unwrap()
            .split_whitespace()
            .take(2)
            .eq(["cfg", "2"]),
        "{out}"
    );
    k(
        &s,
        &[
            "patch",
            "cm",
            "cfg",
            "--type",
            "merge",
            "-p",
            r#"{"data":{"c":"3"}}"#,
        ],
    )?;
    k(
        &s,
        &[
            "patch",
            "cm",
            "cfg",
            "--type",
            "json",
            "-p",
            r#"[{"op":"remove","path":"/data/a"}]"#,
        ],
    )?;
    k(
        &s,
        &[
            "patch",
            "cm",
            "cfg",
            "-p",
            r#"{"metadata":{"labels":{"s":"t"}}}"#,
        ],
    )?;
    let v: Value = serde_json::from_str(&k(&s, &["get", "cm", "cfg", "-o", "json"])?)?;
    assert_eq!(v["data"], json!({"b": "2", "c": "3"}));
    assert_eq!(v["metadata"]["labels"]["s"], "t");

    let ssa = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\ndata: {b: \"20\"}\n";
    let o = kubectl_stdin(&s, &["apply", "--server-side", "-f", "-"], Some(ssa))?;
    assert!(!o.status.success(), "b belongs to kubectl-create");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("conflict"),
        "{o:?}"
    );
    ks(
        &s,
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        Some(ssa),
    )?;
    assert_eq!(
        k(&s, &["get", "cm", "cfg", "-o", "jsonpath={.data.b}"])?,
        "20"
    );

    // describe lists events through field selectors.
    let uid = k(&s, &["get", "pod", "web", "-o", "jsonpath={.metadata.uid}"])?;
    let event = format!("apiVersion: v1\nkind: Event\nmetadata: {{name: web.1}}\ninvolvedObject: {{kind: Pod, name: web, namespace: default, uid: {uid}}}\nreason: Pulled\nmessage: pulled it\ntype: Normal\ncount: 1\nsource: {{component: edge-rt}}\n");
    ks(&s, &["create", "-f", "-"], Some(&event))?;
    let out = k(&s, &["describe", "pod", "web"])?;
    assert!(
        out.contains("Name:         web") && out.contains("Pulled") && out.contains("pulled it"),
        "{out}"
    );
    let out = k(&s, &["describe", "node", "n1"])?;
    assert!(out.contains("Name:               n1"), "{out}");

    k(&s, &["delete", "cm", "cfg"])?;
    k(&s, &["delete", "pod", "web"])?;
    assert!(k(&s, &["get", "pods", "-o", "name"])?.is_empty());
    Ok(())
}

#[tokio::test]
async fn kubectl_wait_for_conditions_and_deletion() -> Result<()> {
    let s = TestApiServer::start()?;
    let c = Client::admin(&s)?;
    let mut p = pod("w", json!({}));
    p["spec"]["nodeName"] = json!("n1");
    c.ok(c.post(PODS, p), 201).await?;
    let mut wait = s.kubectl();
    wait.args(["wait", "--for=condition=Ready", "pod/w", "--timeout=10s"]);
    let waiter = std::thread::spawn(move || wait.output());
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!waiter.is_finished(), "not Ready yet");
    c.ok(c.patch(&format!("{PODS}/w/status"), "merge",
        json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})), 200).await?;
    let out = waiter.join().unwrap()?;
    assert!(out.status.success(), "{out:?}");

    // kubectl delete waits (by watching) until the node side finishes.
    let mut del = s.kubectl();
    del.args(["delete", "pod", "w", "--timeout=10s"]);
    let deleter = std::thread::spawn(move || del.output());
    let mut wait = s.kubectl();
    wait.args(["wait", "--for=delete", "pod/w", "--timeout=10s"]);
    let waiter = std::thread::spawn(move || wait.output());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!deleter.is_finished() && !waiter.is_finished());
    let v = c.ok(c.get(&format!("{PODS}/w")), 200).await?;
    assert!(v["metadata"]["deletionTimestamp"].is_string());
    c.ok(
        c.delete(&format!("{PODS}/w"), json!({"gracePeriodSeconds": 0})),
        200,
    )
    .await?;
    let out = deleter.join().unwrap()?;
    assert!(out.status.success(), "{out:?}");
    let out = waiter.join().unwrap()?;
    assert!(out.status.success(), "{out:?}");
    Ok(())
}

/// A tiny admission webhook: adds a toleration to every pod it is asked
/// about, unless the pod is labelled deny=yes (then it refuses).
async fn webhook_server(
    ca: &rcgen::Issuer<'_, rcgen::KeyPair>,
) -> Result<(u16, tokio::task::JoinHandle<()>)> {
    let key = rcgen::KeyPair::generate()?;
    let mut p = rcgen::CertificateParams::new(vec![])?;
    p.subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse()?));
    let cert = p.signed_by(&key, ca)?;
    let tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())?,
        )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let body = req.into_body().collect().await?.to_bytes();
                        let review: Value = serde_json::from_slice(&body).unwrap_or_default();
                        let r = &review["request"];
                        let deny = r["object"]["metadata"]["labels"]["deny"] == "yes";
                        let patch = json!([{"op": "add", "path": "/spec/tolerations/-", "value":
                        {"key": "node-role.kubernetes.io/edge", "operator": "Exists", "effect": "NoSchedule"}}]);
                        let mut resp = json!({"uid": r["uid"], "allowed": !deny});
                        if deny {
                            resp["status"] = json!({"code": 403, "message": "labelled deny"});
                        } else {
                            resp["patchType"] = json!("JSONPatch");
                            resp["patch"] = json!(STANDARD.encode(patch.to_string()));
                        }
                        let out = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": resp});
                        Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from(
                            out.to_string(),
                        ))))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((port, task))
}

// The webhook is served from this test's runtime while kubectl blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_webhook_adds_a_toleration_on_pod_create() -> Result<()> {
    let s = TestApiServer::start()?;
    let c = Client::admin(&s)?;
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::new(vec![])?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let (port, _task) = webhook_server(&issuer).await?;

    let mwc = |name: &str, url: String, policy: &str, bundle: &str| {
        json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [{"name": format!("{name}.example.com"), "admissionReviewVersions": ["v1"],
                "sideEffects": "None", "failurePolicy": policy, "timeoutSeconds": 2,
                "clientConfig": {"url": url, "caBundle": STANDARD.encode(bundle)},
                "objectSelector": {"matchExpressions": [{"key": "skip", "operator": "DoesNotExist"}]},
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}]}]})
    };
    let mw = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations";
    c.ok(
        c.post(
            mw,
            mwc(
                "tolerate",
                format!("https://127.0.0.1:{port}/mutate"),
                "Fail",
                &ca_cert.pem(),
            ),
        ),
        201,
    )
    .await?;

    let v = c.ok(c.post(PODS, pod("edge", json!({}))), 201).await?;
    let tols = v["spec"]["tolerations"].as_array().unwrap();
    assert!(
        tols.iter()
            .any(|t| t["key"] == "node-role.kubernetes.io/edge" && t["effect"] == "NoSchedule"),
        "{tols:?}"
    );
    // Not selected: untouched.
    let v = c
        .ok(c.post(PODS, pod("skipped", json!({"skip": "1"}))), 201)
        .await?;
    assert!(!v["spec"]["tolerations"]
        .to_string()
        .contains("node-role.kubernetes.io/edge"));
    // Other resources are not sent.
    c.ok(c.post(CMS, cm("x", json!({}))), 201).await?;
    // Refusals reach the client.
    let (code, st) = c.post(PODS, pod("no", json!({"deny": "yes"}))).await?;
    assert_eq!(code, 403);
    assert!(
        st["message"].as_str().unwrap().contains("labelled deny"),
        "{st}"
    );
    // Through kubectl too.
    ks(&s, &["run", "viakubectl", "--image=busybox"], None)?;
    let tols = k(
        &s,
        &[
            "get",
            "pod",
            "viakubectl",
            "-o",
            "jsonpath={.spec.tolerations[*].key}",
        ],
    )?;
    assert!(tols.contains("node-role.kubernetes.io/edge"), "{tols}");

    // A webhook that cannot be reached: Fail refuses, Ignore lets through.
    c.ok(c.delete(&format!("{mw}/tolerate"), json!({})), 200)
        .await?;
    c.ok(
        c.post(
            mw,
            mwc(
                "down",
                "https://127.0.0.1:1/x".into(),
                "Fail",
                &ca_cert.pem(),
            ),
        ),
        201,
    )
    .await?;
    let (code, st) = c.post(PODS, pod("blocked", json!({}))).await?;
    assert_eq!(code, 500, "{st}");
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("failed calling webhook"),
        "{st}"
    );
    c.ok(
        c.patch(
            &format!("{mw}/down"),
            "json",
            json!([{"op": "replace", "path": "/webhooks/0/failurePolicy", "value": "Ignore"}]),
        ),
        200,
    )
    .await?;
    c.ok(c.post(PODS, pod("through", json!({}))), 201).await?;
    // A server the caBundle does not vouch for is a failure too.
    let other = TestApiServer::start()?;
    c.ok(
        c.post(
            mw,
            mwc(
                "wrongca",
                format!("https://127.0.0.1:{port}/mutate"),
                "Fail",
                other.ca_pem(),
            ),
        ),
        201,
    )
    .await?;
    assert_eq!(c.post(PODS, pod("untrusted", json!({}))).await?.0, 500);
    Ok(())
}

/// The `kube` crate (cloud-gw's client) against the server: typed create,
/// list, watch with a field selector and bookmarks, status patch, Lease
/// replace with optimistic concurrency.
#[tokio::test]
async fn the_kube_client_lists_watches_and_patches() -> Result<()> {
    use futures_util::StreamExt;
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};

    let s = TestApiServer::start()?;
    let kc = kube::config::Kubeconfig::read_from(s.kubeconfig())?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    let client = kube::Client::try_from(cfg)?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let all: Api<Pod> = Api::all(client.clone());

    let mut p: Pod = serde_json::from_value(pod("k1", json!({})))?;
    pods.create(&PostParams::default(), &p).await?;
    let list = all
        .list(&ListParams::default().fields("spec.nodeName!="))
        .await?;
    assert!(list.items.is_empty(), "k1 is not on a node");
    let rv0 = list.metadata.resource_version.clone().context("list rv")?;
    let mut w = all
        .watch(&WatchParams::default().fields("spec.nodeName!="), &rv0)
        .await?
        .boxed();
    p = serde_json::from_value(pod("k2", json!({})))?;
    p.spec.as_mut().unwrap().node_name = Some("edge-1".into());
    pods.create(&PostParams::default(), &p).await?;
    match w.next().await.context("watch ended")?? {
        WatchEvent::Added(p) => assert_eq!(p.metadata.name.as_deref(), Some("k2")),
        e => bail!("expected ADDED k2, got {e:?}"),
    }
    let st = pods
        .patch_status(
            "k2",
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {"phase": "Running"}})),
        )
        .await?;
    assert_eq!(st.status.and_then(|s| s.phase).as_deref(), Some("Running"));
    match w.next().await.context("watch ended")?? {
        WatchEvent::Modified(p) => {
            assert_eq!(p.status.and_then(|s| s.phase).as_deref(), Some("Running"))
        }
        e => bail!("expected MODIFIED k2, got {e:?}"),
    }

    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    let l: Lease = serde_json::from_value(
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "edge-1"}, "spec": {"holderIdentity": "edge-1", "leaseDurationSeconds": 40}}),
    )?;
    let mut l = leases.create(&PostParams::default(), &l).await?;
    l.spec.as_mut().unwrap().lease_duration_seconds = Some(41);
    let fresh = leases.replace("edge-1", &PostParams::default(), &l).await?;
    // The same (now stale) copy again: 409.
    match leases.replace("edge-1", &PostParams::default(), &l).await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 409),
        r => bail!("expected a conflict, got {r:?}"),
    }
    assert_eq!(fresh.spec.unwrap().lease_duration_seconds, Some(41));
    match leases.get("nope").await {
        Err(kube::Error::Api(e)) => assert_eq!((e.code, e.reason.as_str()), (404, "NotFound")),
        r => bail!("expected 404, got {r:?}"),
    }
    Ok(())
}

/// `cloud-gw manifests` piped into `kubectl apply -f -`, as an operator
/// installs it; kubectl's stdout.
fn apply_cloud_gw_manifests(s: &TestApiServer) -> Result<String> {
    use std::process::{Command, Stdio};
    let bin = outrigger_tests::util::cloud_gw_bin();
    if !bin.exists() {
        bail!(
            "{} is missing: build it first with `cargo build -p cloud-gw`",
            bin.display()
        );
    }
    let mut gw = Command::new(&bin)
        .args(["manifests", "--san", "edge.example.com"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", bin.display()))?;
    let pipe = gw.stdout.take().context("cloud-gw stdout")?;
    let apply = s
        .kubectl()
        .args(["apply", "-f", "-"])
        .stdin(pipe)
        .output()
        .context("running kubectl")?;
    let gw = gw.wait_with_output()?;
    if !gw.status.success() {
        bail!(
            "cloud-gw manifests failed: {}",
            String::from_utf8_lossy(&gw.stderr)
        );
    }
    if !apply.status.success() {
        bail!(
            "kubectl apply of cloud-gw's manifests failed: {}{}",
            String::from_utf8_lossy(&apply.stdout),
            String::from_utf8_lossy(&apply.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&apply.stdout).into_owned())
}

#[test]
fn kubectl_applies_cloud_gw_manifests_idempotently() -> Result<()> {
    let s = TestApiServer::start()?;
    // The node-lease Role and RoleBinding go into a namespace the server
    // has from the start, as a cluster does.
    k(&s, &["get", "namespace", "kube-node-lease"])?;

    let out = apply_cloud_gw_manifests(&s)?;
    let created: Vec<&str> = out.lines().collect();
    let want = [
        "namespace/outrigger-system",
        "serviceaccount/cloud-gw",
        "clusterrole.rbac.authorization.k8s.io/outrigger:cloud-gw",
        "clusterrolebinding.rbac.authorization.k8s.io/outrigger:cloud-gw",
        "role.rbac.authorization.k8s.io/outrigger:cloud-gw",
        "rolebinding.rbac.authorization.k8s.io/outrigger:cloud-gw",
        "role.rbac.authorization.k8s.io/outrigger:cloud-gw-pki",
        "rolebinding.rbac.authorization.k8s.io/outrigger:cloud-gw-pki",
        "deployment.apps/cloud-gw",
        "service/cloud-gw",
        "service/cloud-gw-edge",
        "mutatingwebhookconfiguration.admissionregistration.k8s.io/outrigger-cloud-gw",
    ];
    for w in want {
        assert!(
            created.contains(&format!("{w} created").as_str()),
            "{w} not created: {out}"
        );
    }
    assert_eq!(created.len(), want.len(), "{out}");

    let get = |args: &[&str]| -> Result<Value> {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        Ok(serde_json::from_str(&k(&s, &a)?)?)
    };
    let sys = "outrigger-system";
    let lease_ns = "kube-node-lease";

    let ns = get(&["namespace", sys])?;
    assert_eq!(
        ns["metadata"]["labels"]["outrigger.io/autonomy"],
        "disabled"
    );
    get(&["serviceaccount", "cloud-gw", "-n", sys])?;

    let cr = get(&["clusterrole", "outrigger:cloud-gw"])?;
    assert!(
        cr["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["resources"].as_array().unwrap().contains(&json!("nodes"))),
        "{cr}"
    );
    let sa_subject = json!([{"kind": "ServiceAccount", "name": "cloud-gw", "namespace": sys}]);
    let crb = get(&["clusterrolebinding", "outrigger:cloud-gw"])?;
    assert_eq!(
        crb["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "outrigger:cloud-gw"})
    );
    assert_eq!(crb["subjects"], sa_subject);

    let role = get(&["role", "outrigger:cloud-gw", "-n", lease_ns])?;
    assert_eq!(role["rules"][0]["resources"], json!(["leases"]), "{role}");
    let rb = get(&["rolebinding", "outrigger:cloud-gw", "-n", lease_ns])?;
    assert_eq!(rb["roleRef"]["kind"], "Role");
    assert_eq!(rb["roleRef"]["name"], "outrigger:cloud-gw");
    assert_eq!(rb["subjects"], sa_subject);

    let pki = get(&["role", "outrigger:cloud-gw-pki", "-n", sys])?;
    assert!(
        pki["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["resourceNames"] == json!(["cloud-gw-pki"])),
        "{pki}"
    );
    let rb = get(&["rolebinding", "outrigger:cloud-gw-pki", "-n", sys])?;
    assert_eq!(rb["roleRef"]["name"], "outrigger:cloud-gw-pki");
    assert_eq!(rb["subjects"], sa_subject);

    let d = get(&["deployment", "cloud-gw", "-n", sys])?;
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "cloud-gw");
    let args = pod["containers"][0]["args"].as_array().unwrap();
    assert!(
        args.contains(&json!("--secret=outrigger-system/cloud-gw-pki")),
        "{args:?}"
    );
    assert!(args.contains(&json!("--san=edge.example.com")), "{args:?}");

    let svc = get(&["service", "cloud-gw", "-n", sys])?;
    assert!(
        svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "webhook" && p["port"] == 443),
        "{svc}"
    );
    let edge = get(&["service", "cloud-gw-edge", "-n", sys])?;
    assert_eq!(edge["spec"]["type"], "LoadBalancer");

    let mwc = get(&["mutatingwebhookconfiguration", "outrigger-cloud-gw"])?;
    let hook = &mwc["webhooks"][0];
    assert_eq!(hook["clientConfig"]["service"]["name"], "cloud-gw", "{mwc}");
    assert_eq!(hook["clientConfig"]["service"]["namespace"], sys);
    assert!(
        hook["namespaceSelector"]["matchExpressions"]
            .as_array()
            .unwrap()
            .contains(
                &json!({"key": "outrigger.io/autonomy", "operator": "NotIn", "values": ["disabled"]})
            ),
        "{hook}"
    );

    // The RBAC kinds print as kube-apiserver's tables do.
    let out = k(&s, &["get", "rolebindings", "-n", lease_ns])?;
    let head: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(head, ["NAME", "ROLE", "AGE"], "{out}");
    assert!(
        out.contains("outrigger:cloud-gw   Role/outrigger:cloud-gw"),
        "{out}"
    );

    // Applying again changes nothing.
    let again = apply_cloud_gw_manifests(&s)?;
    let lines: Vec<&str> = again.lines().collect();
    assert_eq!(lines.len(), want.len(), "{again}");
    for w in want {
        assert!(
            lines
                .iter()
                .any(|l| *l == format!("{w} unchanged") || *l == format!("{w} configured")),
            "{w} not unchanged or configured: {again}"
        );
    }
    Ok(())
}
