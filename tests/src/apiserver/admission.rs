//! Mutating admission webhooks, as the MutatingAdmissionWebhook plugin
//! calls them: every MutatingWebhookConfiguration (by name), every webhook
//! in it whose rules, namespaceSelector and objectSelector match gets an
//! AdmissionReview v1 over HTTPS, verified against its caBundle; its
//! JSONPatch applies before the next one is asked. matchConditions (CEL)
//! and reinvocation are not implemented.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};

use super::patch::json_patch;
use super::resources::ResourceDef;
use super::selector::LabelSelector;
use super::status::{ApiError, ApiResult};
use super::User;
use crate::pki::provider;

pub struct AdmitReq<'a> {
    pub def: &'a ResourceDef,
    pub sub: &'a str,
    /// CREATE, UPDATE.
    pub op: &'a str,
    pub name: &'a str,
    pub ns: &'a str,
    pub old: Option<&'a Value>,
    pub user: &'a User,
    pub dry_run: bool,
    /// Labels of the object's namespace (namespaceSelector).
    pub ns_labels: BTreeMap<String, String>,
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn rule_matches(rule: &Value, req: &AdmitReq<'_>) -> bool {
    let any = |list: Vec<&str>, want: &str| list.iter().any(|x| *x == "*" || *x == want);
    let resource = if req.sub.is_empty() {
        req.def.plural.clone()
    } else {
        format!("{}/{}", req.def.plural, req.sub)
    };
    let res_ok = strs(&rule["resources"]).iter().any(|r| {
        *r == "*/*"
            || *r == resource
            || (*r == "*" && req.sub.is_empty())
            || r.strip_suffix("/*") == Some(req.def.plural.as_str()) && !req.sub.is_empty()
            || r.strip_prefix("*/") == Some(req.sub) && !req.sub.is_empty()
    });
    let scope_ok = match rule["scope"].as_str().unwrap_or("*") {
        "Namespaced" => req.def.namespaced,
        "Cluster" => !req.def.namespaced,
        _ => true,
    };
    any(strs(&rule["operations"]), req.op)
        && any(strs(&rule["apiGroups"]), &req.def.group)
        && any(strs(&rule["apiVersions"]), &req.def.version)
        && res_ok
        && scope_ok
}

fn selected(wh: &Value, obj: &Value, req: &AdmitReq<'_>) -> ApiResult<bool> {
    if !wh["rules"]
        .as_array()
        .is_some_and(|rs| rs.iter().any(|r| rule_matches(r, req)))
    {
        return Ok(false);
    }
    if wh["namespaceSelector"].is_object() {
        let sel = LabelSelector::from_object(&wh["namespaceSelector"])?;
        let ok = if req.def.is("", "namespaces") {
            sel.matches(obj)
        } else if req.def.namespaced {
            sel.matches_labels(&req.ns_labels)
        } else {
            // Other cluster-scoped objects are never skipped for it.
            true
        };
        if !ok {
            return Ok(false);
        }
    }
    if wh["objectSelector"].is_object() {
        let sel = LabelSelector::from_object(&wh["objectSelector"])?;
        if !(sel.matches(obj) || req.old.is_some_and(|o| sel.matches(o))) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Run the mutating webhooks of `configs` on `obj`.
pub async fn mutate(
    configs: &[Arc<Value>],
    mut obj: Value,
    req: &AdmitReq<'_>,
    services: &HashMap<String, SocketAddr>,
) -> ApiResult<Value> {
    let mut configs: Vec<&Arc<Value>> = configs.iter().collect();
    configs.sort_by_key(|c| {
        c["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    });
    for cfg in configs {
        for wh in cfg["webhooks"].as_array().into_iter().flatten() {
            if !selected(wh, &obj, req)? {
                continue;
            }
            let name = wh["name"].as_str().unwrap_or_default();
            let fail_open = wh["failurePolicy"].as_str() == Some("Ignore");
            match call(wh, &obj, req, services).await {
                Ok(resp) => {
                    if resp["allowed"] != true {
                        let st = &resp["status"];
                        let code = st["code"].as_u64().unwrap_or(400) as u16;
                        let msg = st["message"].as_str().unwrap_or_default();
                        let mut e = ApiError::new(
                            code,
                            "Forbidden",
                            format!("admission webhook \"{name}\" denied the request: {msg}"),
                        );
                        if code != 403 {
                            e.reason = "BadRequest";
                        }
                        return Err(e);
                    }
                    if let Some(p) = resp["patch"].as_str() {
                        if resp["patchType"].as_str() != Some("JSONPatch") {
                            return Err(ApiError::internal(format!(
                                "admission webhook \"{name}\": unsupported patchType {}",
                                resp["patchType"]
                            )));
                        }
                        let ops: Value = STANDARD
                            .decode(p)
                            .ok()
                            .and_then(|b| serde_json::from_slice(&b).ok())
                            .ok_or_else(|| {
                                ApiError::internal(format!(
                                    "admission webhook \"{name}\" returned an undecodable patch"
                                ))
                            })?;
                        json_patch(&mut obj, &ops).map_err(|e| {
                            ApiError::internal(format!(
                                "admission webhook \"{name}\" returned a patch that does not apply: {e}"
                            ))
                        })?;
                    }
                }
                Err(_) if fail_open => continue,
                Err(e) => {
                    return Err(ApiError::internal(format!(
                        "Internal error occurred: failed calling webhook \"{name}\": {e:#}"
                    )))
                }
            }
        }
    }
    Ok(obj)
}

async fn call(
    wh: &Value,
    obj: &Value,
    req: &AdmitReq<'_>,
    services: &HashMap<String, SocketAddr>,
) -> Result<Value> {
    let uid = super::uuid();
    let d = req.def;
    let gvr = json!({"group": d.group, "version": d.version, "resource": d.plural});
    let gvk = json!({"group": d.group, "version": d.version, "kind": d.kind});
    let mut r = json!({
        "uid": uid,
        "kind": gvk, "resource": gvr,
        "requestKind": gvk, "requestResource": gvr,
        "name": req.name,
        "operation": req.op,
        "userInfo": {"username": req.user.name, "groups": req.user.groups},
        "object": obj,
        "oldObject": req.old,
        "dryRun": req.dry_run,
        "options": {"apiVersion": "meta.k8s.io/v1",
                     "kind": if req.op == "CREATE" { "CreateOptions" } else { "UpdateOptions" }},
    });
    if !req.ns.is_empty() {
        r["namespace"] = json!(req.ns);
    }
    if !req.sub.is_empty() {
        r["subResource"] = json!(req.sub);
    }
    let review =
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": r});
    let cc = &wh["clientConfig"];
    let (host, addr, path) = if let Some(url) = cc["url"].as_str() {
        let uri: hyper::Uri = url.parse().context("clientConfig.url")?;
        if uri.scheme_str() != Some("https") {
            bail!("clientConfig.url must be https");
        }
        let host = uri.host().ok_or_else(|| anyhow!("no host in {url}"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(443);
        let addr = format!("{host}:{port}");
        let path = uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or("/".into());
        (host, addr, path)
    } else if cc["service"].is_object() {
        let s = &cc["service"];
        let (name, ns) = (
            s["name"].as_str().unwrap_or_default(),
            s["namespace"].as_str().unwrap_or_default(),
        );
        let port = s["port"].as_u64().unwrap_or(443);
        let key = format!("{name}.{ns}");
        let addr = services
            .get(&key)
            .or_else(|| services.get(&format!("{key}:{port}")))
            .ok_or_else(|| anyhow!("service {key} has no address (Options::services)"))?;
        let path = s["path"].as_str().unwrap_or("/").to_string();
        (format!("{name}.{ns}.svc"), addr.to_string(), path)
    } else {
        bail!("webhook has neither clientConfig.url nor clientConfig.service");
    };
    let mut roots = rustls::RootCertStore::empty();
    if let Some(b) = cc["caBundle"].as_str() {
        let pem = STANDARD.decode(b).context("caBundle is not base64")?;
        for c in CertificateDer::pem_slice_iter(&pem) {
            roots.add(c.context("caBundle")?)?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let timeout = Duration::from_secs(wh["timeoutSeconds"].as_u64().unwrap_or(10));
    let body = serde_json::to_vec(&review)?;
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let name = ServerName::try_from(host.clone())?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .context("TLS")?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let request = hyper::Request::post(path)
            .header(hyper::header::HOST, &host)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let resp = sender.send_request(request).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!("webhook answered {status}");
        }
        let v: Value = serde_json::from_slice(&bytes).context("decoding AdmissionReview")?;
        Ok::<Value, anyhow::Error>(v)
    };
    let v = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| anyhow!("context deadline exceeded ({timeout:?})"))??;
    let resp = v["response"].clone();
    if resp["uid"].as_str() != Some(uid.as_str()) {
        bail!("expected response.uid={uid:?}, got {}", resp["uid"]);
    }
    Ok(resp)
}
