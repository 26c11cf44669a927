//! OpenAPI documents, enough for clients that read them to choose their
//! path: per group-version v3 documents list every operation with its
//! `x-kubernetes-group-version-kind` and query parameters, so kubectl
//! (`--validate=strict`, its default) sees that the server supports
//! `fieldValidation` and leaves validation to it. Schemas are not served
//! (kubectl explain has nothing to show; kubectl then computes strategic
//! patches from its compiled-in types).

use serde_json::{json, Map, Value};

use super::resources::{Registry, ResourceDef};

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

fn param(name: &str) -> Value {
    json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}})
}

fn op(def: &ResourceDef, action: &str, params: &[&str]) -> Value {
    let mut o = json!({
        "operationId": format!("{action}{}", def.kind),
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": def.group, "version": def.version, "kind": def.kind},
        "parameters": params.iter().map(|p| param(p)).collect::<Vec<_>>(),
        "responses": {"200": {"description": "OK"}, "401": {"description": "Unauthorized"}},
    });
    if matches!(action, "post" | "put" | "patch") {
        o["requestBody"] = json!({"content": {"application/json": {"schema": {"type": "object"}}}});
    }
    o
}

/// The v3 root: one entry per group-version. The hash changes when the
/// served resources do, so cached documents are refetched.
pub fn v3_root(reg: &Registry) -> Value {
    let mut paths = Map::new();
    for (g, versions) in reg.groups() {
        for v in versions {
            let p = gv_path(&g, &v);
            let doc = v3_doc(reg, &g, &v);
            let hash = fnv(doc.to_string().as_bytes());
            paths.insert(
                p.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={hash:016X}")}),
            );
        }
    }
    json!({ "paths": paths })
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, c| {
        (h ^ *c as u64).wrapping_mul(0x100000001b3)
    })
}

pub fn v3_doc(reg: &Registry, group: &str, version: &str) -> Value {
    let mut paths = Map::new();
    let write = ["dryRun", "fieldManager", "fieldValidation", "pretty"];
    let patch = [
        "dryRun",
        "fieldManager",
        "fieldValidation",
        "force",
        "pretty",
    ];
    let read = [
        "allowWatchBookmarks",
        "continue",
        "fieldSelector",
        "labelSelector",
        "limit",
        "resourceVersion",
        "resourceVersionMatch",
        "sendInitialEvents",
        "timeoutSeconds",
        "watch",
        "pretty",
    ];
    for d in reg.in_group_version(group, version) {
        let base = format!("/{}", gv_path(group, version));
        let coll = if d.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}", d.plural)
        } else {
            format!("{base}/{}", d.plural)
        };
        paths.insert(
            coll.clone(),
            json!({
                "get": op(&d, "list", &read),
                "post": op(&d, "post", &write),
                "delete": op(&d, "deletecollection", &["dryRun", "gracePeriodSeconds", "propagationPolicy"]),
            }),
        );
        paths.insert(
            format!("{coll}/{{name}}"),
            json!({
                "get": op(&d, "get", &["pretty"]),
                "put": op(&d, "put", &write),
                "patch": op(&d, "patch", &patch),
                "delete": op(&d, "delete", &["dryRun", "gracePeriodSeconds", "propagationPolicy"]),
            }),
        );
        if d.status {
            paths.insert(
                format!("{coll}/{{name}}/status"),
                json!({
                    "get": op(&d, "get", &["pretty"]),
                    "put": op(&d, "put", &write),
                    "patch": op(&d, "patch", &patch),
                }),
            );
        }
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": {}},
    })
}

/// An OpenAPI v2 document with no paths, in protobuf (the
/// gnostic `openapi_v2.Document`: swagger = 1, info = 2 {title = 1,
/// version = 2}), which is what client-go's discovery asks for.
pub fn v2_protobuf() -> Vec<u8> {
    fn field(num: u8, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![(num << 3) | 2, bytes.len() as u8];
        out.extend_from_slice(bytes);
        out
    }
    let info = [field(1, b"Kubernetes"), field(2, b"v1.32.0")].concat();
    [field(1, b"2.0"), field(2, &info)].concat()
}

pub fn v2_json() -> Value {
    json!({"swagger": "2.0", "info": {"title": "Kubernetes", "version": "v1.32.0"}, "paths": {}, "definitions": {}})
}
