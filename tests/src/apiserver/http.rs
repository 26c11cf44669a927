//! HTTPS front: TLS with optional client certificates, authentication,
//! URL routing as kube-apiserver lays it out, discovery, content
//! negotiation (JSON, Table, PartialObjectMetadata) and the verbs.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::api::{now, Api, Ctx, DeleteOpts, Filter, PatchType};
use super::openapi;
use super::resources::Registry;
use super::status::{ApiError, ApiResult};
use super::table;
use super::watch::{self, ChannelBody, Format};
use super::User;
use crate::pki::cert_user;

pub type Body = BoxBody<Bytes, Infallible>;

pub struct Shared {
    pub api: Arc<Api>,
    pub tokens: Mutex<HashMap<String, User>>,
    /// host:port clients reach us at.
    pub address: String,
    pub log: bool,
}

const MAX_BODY: usize = 3 * 1024 * 1024;

pub async fn serve(listener: TcpListener, tls: tokio_rustls::TlsAcceptor, shared: Arc<Shared>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (tls, shared) = (tls.clone(), shared.clone());
        tokio::spawn(async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await
            else {
                return;
            };
            let cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| cert_user(c));
            let svc = hyper::service::service_fn(move |req| {
                let (shared, cert) = (shared.clone(), cert.clone());
                async move { Ok::<_, Infallible>(handle(shared, cert, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

fn json_response(code: u16, v: &Value, ctype: &str) -> Response<Body> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::OK);
    if let Ok(h) = HeaderValue::from_str(ctype) {
        r.headers_mut().insert(CONTENT_TYPE, h);
    }
    r
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.to_status(), "application/json")
}

enum Reply {
    Json(u16, Value),
    /// Content type of its own (tables, protobuf).
    Typed(u16, String, Bytes),
    Stream(String, ChannelBody),
}

fn authenticate(
    shared: &Shared,
    cert: Option<(String, Vec<String>)>,
    req: &Request<hyper::body::Incoming>,
) -> Option<User> {
    let with_all = |name: String, mut groups: Vec<String>| {
        groups.push("system:authenticated".into());
        User { name, groups }
    };
    if let Some((name, groups)) = cert {
        return Some(with_all(name, groups));
    }
    let auth = req.headers().get("authorization")?.to_str().ok()?;
    let token = auth.strip_prefix("Bearer ")?.trim();
    let tokens = shared.tokens.lock().unwrap_or_else(|e| e.into_inner());
    let u = tokens.get(token)?;
    Some(with_all(u.name.clone(), u.groups.clone()))
}

async fn handle(
    shared: Arc<Shared>,
    cert: Option<(String, Vec<String>)>,
    req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let public = matches!(uri.path(), "/healthz" | "/livez" | "/readyz" | "/version");
    let user = authenticate(&shared, cert, &req);
    let resp = match (user, public) {
        (None, false) => error_response(&ApiError::unauthorized()),
        (user, _) => {
            let user = user.unwrap_or(User {
                name: "system:anonymous".into(),
                groups: vec!["system:unauthenticated".into()],
            });
            match route(&shared, user, req).await {
                Ok((reply, warnings)) => {
                    let mut r = match reply {
                        Reply::Json(code, v) => json_response(code, &v, "application/json"),
                        Reply::Typed(code, ct, b) => {
                            let mut r = Response::new(full(b));
                            *r.status_mut() =
                                hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::OK);
                            if let Ok(h) = HeaderValue::from_str(&ct) {
                                r.headers_mut().insert(CONTENT_TYPE, h);
                            }
                            r
                        }
                        Reply::Stream(ct, body) => {
                            let mut r = Response::new(body.boxed());
                            if let Ok(h) = HeaderValue::from_str(&ct) {
                                r.headers_mut().insert(CONTENT_TYPE, h);
                            }
                            r
                        }
                    };
                    for w in warnings {
                        let text =
                            format!("299 - \"{}\"", w.replace('\\', "\\\\").replace('"', "\\\""));
                        if let Ok(h) = HeaderValue::from_str(&text) {
                            r.headers_mut().append("warning", h);
                        }
                    }
                    r
                }
                Err(e) => error_response(&e),
            }
        }
    };
    if shared.log {
        eprintln!(
            "test-apiserver: {method} {uri} -> {}",
            resp.status().as_u16()
        );
    }
    resp
}

fn query_map(q: Option<&str>) -> HashMap<String, String> {
    form_urlencoded::parse(q.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

/// What the Accept header asks for, in its order of preference.
fn format(accept: &str) -> Format {
    for mt in accept.split(',') {
        let mut parts = mt.split(';').map(str::trim);
        let base = parts.next().unwrap_or_default();
        let params: HashMap<&str, &str> = parts.filter_map(|p| p.split_once('=')).collect();
        if !matches!(base, "application/json" | "*/*" | "application/*") {
            continue;
        }
        match params.get("as").copied() {
            None => return Format::Json,
            Some("Table") if params.get("g").copied() == Some("meta.k8s.io") => {
                return Format::Table(String::new())
            }
            Some("PartialObjectMetadata") | Some("PartialObjectMetadataList") => {
                return Format::Partial
            }
            _ => continue,
        }
    }
    Format::Json
}

const TABLE_CT: &str = "application/json;as=Table;v=v1;g=meta.k8s.io";

fn version() -> Value {
    json!({
        "major": "1", "minor": "32", "gitVersion": "v1.32.0",
        "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.23.4", "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn group_entry(group: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({"name": group, "versions": vs, "preferredVersion": vs[0]})
}

fn resource_list(reg: &Registry, group: &str, version: &str) -> Option<Value> {
    let defs = reg.in_group_version(group, version);
    if defs.is_empty() {
        return None;
    }
    let mut out = vec![];
    for d in defs {
        let mut r = json!({
            "name": d.plural, "singularName": d.singular, "namespaced": d.namespaced,
            "kind": d.kind, "verbs": d.verbs,
        });
        if !d.short_names.is_empty() {
            r["shortNames"] = json!(d.short_names);
        }
        if !d.categories.is_empty() {
            r["categories"] = json!(d.categories);
        }
        out.push(r);
        if d.status {
            out.push(
                json!({"name": format!("{}/status", d.plural), "singularName": "",
                "namespaced": d.namespaced, "kind": d.kind, "verbs": ["get", "patch", "update"]}),
            );
        }
        if d.is("", "pods") {
            out.push(
                json!({"name": "pods/binding", "singularName": "", "namespaced": true,
                "kind": "Binding", "verbs": ["create"]}),
            );
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out}),
    )
}

async fn route(
    shared: &Shared,
    user: User,
    req: Request<hyper::body::Incoming>,
) -> ApiResult<(Reply, Vec<String>)> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let header = |h: &str| {
        parts
            .headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let accept = header("accept");
    let mut ctx = Ctx {
        user,
        query: query_map(parts.uri.query()),
        warnings: vec![],
        user_agent: header("user-agent"),
    };
    let body = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|_| ApiError::too_large())?
        .to_bytes();
    let api = &shared.api;
    let get_only = |r: Value| {
        if parts.method == Method::GET {
            Ok((Reply::Json(200, r), vec![]))
        } else {
            Err(ApiError::method_not_allowed())
        }
    };
    match path.as_str() {
        "/healthz" | "/livez" | "/readyz" => {
            return Ok((
                Reply::Typed(200, "text/plain; charset=utf-8".into(), Bytes::from("ok")),
                vec![],
            ))
        }
        "/version" => return get_only(version()),
        "/api" => {
            return get_only(json!({"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.address}]}))
        }
        "/apis" => {
            let groups: Vec<Value> = api
                .lock()
                .reg
                .groups()
                .iter()
                .filter(|(g, _)| !g.is_empty())
                .map(|(g, vs)| group_entry(g, vs))
                .collect();
            return get_only(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}));
        }
        "/openapi/v2" => {
            return if accept.contains("protobuf") {
                Ok((
                    Reply::Typed(
                        200,
                        "application/com.github.proto-openapi.spec.v2@v1.0+protobuf".into(),
                        Bytes::from(openapi::v2_protobuf()),
                    ),
                    vec![],
                ))
            } else {
                get_only(openapi::v2_json())
            }
        }
        "/openapi/v3" => return get_only(openapi::v3_root(&api.lock().reg)),
        _ => {}
    }
    if let Some(gv) = path.strip_prefix("/openapi/v3/") {
        let (g, v) = match gv.split('/').collect::<Vec<_>>().as_slice() {
            ["api", v] => ("", *v),
            ["apis", g, v] => (*g, *v),
            _ => return Err(ApiError::no_route()),
        };
        let reg = &api.lock().reg;
        if reg.in_group_version(g, v).is_empty() {
            return Err(ApiError::no_route());
        }
        return get_only(openapi::v3_doc(reg, g, v));
    }

    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", v, rest),
        ["apis", g] => {
            let reg = &api.lock().reg;
            let entry = reg.groups().into_iter().find(|(n, _)| n == g);
            return match entry {
                Some((g, vs)) => {
                    let mut e = group_entry(&g, &vs);
                    e["kind"] = json!("APIGroup");
                    e["apiVersion"] = json!("v1");
                    get_only(e)
                }
                None => Err(ApiError::no_route()),
            };
        }
        ["apis", g, v, rest @ ..] => (g, v, rest),
        _ => return Err(ApiError::no_route()),
    };
    if rest.is_empty() {
        let list = resource_list(&api.lock().reg, group, version).ok_or_else(ApiError::no_route)?;
        return get_only(list);
    }
    let (legacy_watch, rest) = match rest {
        ["watch", r @ ..] if !r.is_empty() => (true, r),
        r => (false, r),
    };
    let (ns, rest): (Option<&str>, &[&str]) = match rest {
        ["namespaces", _, "status" | "finalize"] if group.is_empty() => (None, rest),
        ["namespaces", ns, r @ ..] if !r.is_empty() => (Some(*ns), r),
        r => (None, r),
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, ""),
        [p, n] => (*p, Some(*n), ""),
        [p, n, s] => (*p, Some(*n), *s),
        _ => return Err(ApiError::no_route()),
    };
    let def = api
        .find(group, version, plural)
        .ok_or_else(ApiError::no_route)?;
    if !def.namespaced && ns.is_some() {
        return Err(ApiError::no_route());
    }
    if def.namespaced && ns.is_none() && name.is_some() {
        return Err(ApiError::no_route());
    }
    match sub {
        "" => {}
        "status" if def.status => {}
        "binding" if def.is("", "pods") => {}
        _ => return Err(ApiError::no_route()),
    }
    let ns_s = ns.unwrap_or_default();
    let is_watch = legacy_watch || matches!(ctx.q("watch"), Some("true") | Some("1"));
    let fmt = format(&accept);
    let ct = header("content-type");
    let body_value = |b: &Bytes| -> ApiResult<Value> {
        let base = ct.split(';').next().unwrap_or_default().trim();
        match base {
            "" | "application/json" | "*/*" => serde_json::from_slice(b)
                .map_err(|e| ApiError::bad_request(format!("error decoding body: {e}"))),
            "application/yaml" => serde_yaml_ng::from_slice(b)
                .map_err(|e| ApiError::bad_request(format!("error decoding body: {e}"))),
            "application/vnd.kubernetes.protobuf" => super::protobuf::decode(b).map_err(|e| {
                let mut err = ApiError::unsupported_media_type(base);
                err.message = format!("{} ({e})", err.message);
                err
            }),
            other => Err(ApiError::unsupported_media_type(other)),
        }
    };
    let m = parts.method.clone();
    let verb = match (&m, name.is_some(), is_watch) {
        (&Method::GET, _, true) => "watch",
        (&Method::GET, false, _) => "list",
        (&Method::GET, true, _) => "get",
        (&Method::POST, _, _) => "create",
        (&Method::PUT, _, _) => "update",
        (&Method::PATCH, _, _) => "patch",
        (&Method::DELETE, false, _) => "deletecollection",
        (&Method::DELETE, true, _) => "delete",
        _ => "",
    };
    if sub.is_empty() && !def.has_verb(verb) {
        return Err(ApiError::method_not_allowed());
    }
    let reply = if m == Method::GET && (is_watch || name.is_none()) {
        if is_watch {
            let mut filter = Filter::new(&def, ns, &ctx)?;
            if let Some(n) = name {
                // A legacy /watch/.../name path watches one object.
                let extra = format!("metadata.name={n}");
                let fs = match ctx.q("fieldSelector") {
                    Some(f) => format!("{f},{extra}"),
                    None => extra,
                };
                filter.fields = super::selector::FieldSelector::parse(&fs, &def)?;
            }
            let bookmarks = ctx.q("allowWatchBookmarks") == Some("true");
            let initial = ctx.q("sendInitialEvents") == Some("true");
            if initial && !bookmarks {
                return Err(ApiError::invalid(
                    "meta.k8s.io",
                    "ListOptions",
                    "",
                    &[(
                        "allowWatchBookmarks".into(),
                        "Required value: allowWatchBookmarks must be true if sendInitialEvents is set".into(),
                    )],
                ));
            }
            let timeout =
                match ctx.q("timeoutSeconds") {
                    Some(t) => Duration::from_secs(t.parse().map_err(|_| {
                        ApiError::bad_request(format!("invalid timeoutSeconds {t:?}"))
                    })?),
                    None => api.opts.watch_timeout,
                };
            let start = api.watch(&def, &filter, &ctx)?;
            let params = watch::Params {
                bookmarks,
                initial_end: initial,
                timeout,
                interval: api.opts.bookmark_interval,
                format: fmt.clone(),
            };
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            tokio::spawn(watch::run(
                api.clone(),
                def.clone(),
                filter,
                start,
                tx,
                params,
            ));
            let ct = match fmt {
                Format::Table(_) => TABLE_CT,
                _ => "application/json",
            };
            return Ok((Reply::Stream(ct.into(), ChannelBody { rx }), ctx.warnings));
        }
        let (items, meta) = api.list(&def, ns, &ctx)?;
        match fmt {
            Format::Json => Reply::Json(
                200,
                json!({"kind": def.list_kind, "apiVersion": def.api_version(), "metadata": meta, "items": items}),
            ),
            Format::Partial => Reply::Json(
                200,
                json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": meta,
                       "items": items.iter().map(|o| table::partial(&def, o)).collect::<Vec<_>>()}),
            ),
            Format::Table(_) => {
                let refs: Vec<&Value> = items.iter().collect();
                let include = ctx.q("includeObject").unwrap_or("Metadata");
                let t = table::table(&def, &refs, include, meta);
                Reply::Typed(200, TABLE_CT.into(), Bytes::from(t.to_string()))
            }
        }
    } else if m == Method::GET {
        let name = name.unwrap_or_default();
        let o = api.get(&def, ns_s, name)?;
        match fmt {
            Format::Json => Reply::Json(200, o),
            Format::Partial => Reply::Json(200, table::partial(&def, &o)),
            Format::Table(_) => {
                let include = ctx.q("includeObject").unwrap_or("Metadata");
                let meta = json!({"resourceVersion": o["metadata"]["resourceVersion"]});
                let t = table::table(&def, &[&o], include, meta);
                Reply::Typed(200, TABLE_CT.into(), Bytes::from(t.to_string()))
            }
        }
    } else if m == Method::POST && name.is_none() {
        if def.namespaced && ns.is_none() {
            return Err(ApiError::method_not_allowed());
        }
        if def.is("authentication.k8s.io", "selfsubjectreviews") {
            // Its body says nothing (typed clients send it as protobuf).
            let v = body_value(&body).unwrap_or_default();
            let mut r = json!({"kind": "SelfSubjectReview", "apiVersion": def.api_version(),
                "metadata": {"creationTimestamp": now()},
                "status": {"userInfo": {"username": ctx.user.name, "groups": ctx.user.groups}}});
            if v["metadata"].is_object() {
                r["metadata"]["name"] = v["metadata"]["name"].clone();
            }
            Reply::Json(201, r)
        } else {
            let v = body_value(&body)?;
            let (c, o) = api.create(&def, ns_s, v, &mut ctx).await?;
            Reply::Json(c, o)
        }
    } else if m == Method::POST && sub == "binding" {
        let v = body_value(&body)?;
        let (c, o) = api.bind(ns_s, name.unwrap_or_default(), &v)?;
        Reply::Json(c, o)
    } else if m == Method::PUT && name.is_some() && sub != "binding" {
        let v = body_value(&body)?;
        let (c, o) = api
            .update(&def, ns_s, name.unwrap_or_default(), sub, v, &mut ctx)
            .await?;
        Reply::Json(c, o)
    } else if m == Method::PATCH && name.is_some() && sub != "binding" {
        let base = ct.split(';').next().unwrap_or_default().trim().to_string();
        let pt = match base.as_str() {
            "application/json-patch+json" => PatchType::Json,
            "application/merge-patch+json" => PatchType::Merge,
            "application/strategic-merge-patch+json" => PatchType::Strategic,
            "application/apply-patch+yaml" => PatchType::Apply,
            other => return Err(ApiError::unsupported_media_type(other)),
        };
        let (c, o) = api
            .patch(
                &def,
                ns_s,
                name.unwrap_or_default(),
                sub,
                pt,
                &body,
                &mut ctx,
            )
            .await?;
        Reply::Json(c, o)
    } else if m == Method::DELETE && sub.is_empty() {
        let opts = DeleteOpts::parse(&body, &ctx)?;
        match name {
            Some(n) => {
                let (c, o) = api.delete(&def, ns_s, n, &opts, &ctx)?;
                Reply::Json(c, o)
            }
            None => {
                let (c, o) = api.delete_collection(&def, ns, &opts, &ctx)?;
                Reply::Json(c, o)
            }
        }
    } else {
        return Err(ApiError::method_not_allowed());
    };
    Ok((reply, ctx.warnings))
}
