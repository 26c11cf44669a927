//! Request bodies in Kubernetes' protobuf encoding, for the few kinds
//! kubectl's typed clients send that way (`kubectl create configmap`,
//! `secret`, `namespace`, `serviceaccount`, `role`, `clusterrole`,
//! `rolebinding`, `clusterrolebinding`). The envelope is
//! `k8s\0` + runtime.Unknown{typeMeta, raw}; `raw` is the typed message,
//! decoded here with the field numbers of k8s.io/api's generated.proto.
//! Anything else, or a field not listed, is refused (415), never guessed.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Map, Value};

type Schema = &'static [(u64, &'static str, F)];

enum F {
    /// Server-owned (timestamps, selfLink, managedFields): read past.
    Skip,
    Str,
    Int,
    Bool,
    Msg(Schema),
    MapStr,
    MapBytes,
    RepStr,
    RepMsg(Schema),
}

const OWNER_REF: Schema = &[
    (1, "kind", F::Str),
    (3, "name", F::Str),
    (4, "uid", F::Str),
    (5, "apiVersion", F::Str),
    (6, "controller", F::Bool),
    (7, "blockOwnerDeletion", F::Bool),
];

const OBJECT_META: Schema = &[
    (1, "name", F::Str),
    (2, "generateName", F::Str),
    (3, "namespace", F::Str),
    (4, "selfLink", F::Skip),
    (5, "uid", F::Str),
    (6, "resourceVersion", F::Str),
    (7, "generation", F::Int),
    (8, "creationTimestamp", F::Skip),
    (9, "deletionTimestamp", F::Skip),
    (10, "deletionGracePeriodSeconds", F::Skip),
    (11, "labels", F::MapStr),
    (12, "annotations", F::MapStr),
    (13, "ownerReferences", F::RepMsg(OWNER_REF)),
    (14, "finalizers", F::RepStr),
    (15, "clusterName", F::Skip),
    (17, "managedFields", F::Skip),
];

const OBJECT_REF: Schema = &[
    (1, "kind", F::Str),
    (2, "namespace", F::Str),
    (3, "name", F::Str),
    (4, "uid", F::Str),
    (5, "apiVersion", F::Str),
    (6, "resourceVersion", F::Str),
    (7, "fieldPath", F::Str),
];

const CONFIG_MAP: Schema = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "data", F::MapStr),
    (3, "binaryData", F::MapBytes),
    (4, "immutable", F::Bool),
];

const SECRET: Schema = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "data", F::MapBytes),
    (3, "type", F::Str),
    (4, "stringData", F::MapStr),
    (5, "immutable", F::Bool),
];

const NAMESPACE: Schema = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "spec", F::Msg(&[(1, "finalizers", F::RepStr)])),
    (
        3,
        "status",
        F::Msg(&[(1, "phase", F::Str), (2, "conditions", F::Skip)]),
    ),
];

const SERVICE_ACCOUNT: Schema = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "secrets", F::RepMsg(OBJECT_REF)),
    (3, "imagePullSecrets", F::RepMsg(&[(1, "name", F::Str)])),
    (4, "automountServiceAccountToken", F::Bool),
];

const POLICY_RULE: Schema = &[
    (1, "verbs", F::RepStr),
    (2, "apiGroups", F::RepStr),
    (3, "resources", F::RepStr),
    (4, "resourceNames", F::RepStr),
    (5, "nonResourceURLs", F::RepStr),
];

const LABEL_SELECTOR: Schema = &[
    (1, "matchLabels", F::MapStr),
    (
        2,
        "matchExpressions",
        F::RepMsg(&[
            (1, "key", F::Str),
            (2, "operator", F::Str),
            (3, "values", F::RepStr),
        ]),
    ),
];

const ROLE: Schema = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "rules", F::RepMsg(POLICY_RULE)),
];

const CLUSTER_ROLE: Schema = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "rules", F::RepMsg(POLICY_RULE)),
    (
        3,
        "aggregationRule",
        F::Msg(&[(1, "clusterRoleSelectors", F::RepMsg(LABEL_SELECTOR))]),
    ),
];

/// RoleBinding and ClusterRoleBinding.
const BINDING: Schema = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (
        2,
        "subjects",
        F::RepMsg(&[
            (1, "kind", F::Str),
            (2, "apiGroup", F::Str),
            (3, "name", F::Str),
            (4, "namespace", F::Str),
        ]),
    ),
    (
        3,
        "roleRef",
        F::Msg(&[
            (1, "apiGroup", F::Str),
            (2, "kind", F::Str),
            (3, "name", F::Str),
        ]),
    ),
];

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.b.split_first().ok_or("truncated varint")?;
            self.b = rest;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.varint()? as usize;
        if n > self.b.len() {
            return Err("truncated field".into());
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    /// (field number, wire type), or None at the end.
    fn tag(&mut self) -> Result<Option<(u64, u64)>, String> {
        if self.b.is_empty() {
            return Ok(None);
        }
        let t = self.varint()?;
        Ok(Some((t >> 3, t & 7)))
    }
}

fn text(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "invalid UTF-8".to_string())
}

/// A map entry: key = 1, value = 2.
fn entry(b: &[u8], bytes_value: bool) -> Result<(String, Value), String> {
    let mut r = Reader { b };
    let (mut k, mut v) = (String::new(), Value::String(String::new()));
    while let Some((n, _)) = r.tag()? {
        let f = r.bytes()?;
        match n {
            1 => k = text(f)?,
            2 if bytes_value => v = json!(STANDARD.encode(f)),
            2 => v = json!(text(f)?),
            _ => return Err(format!("map entry field {n}")),
        }
    }
    Ok((k, v))
}

fn message(b: &[u8], schema: Schema) -> Result<Value, String> {
    let mut r = Reader { b };
    let mut out = Map::new();
    while let Some((n, wire)) = r.tag()? {
        let (_, name, f) = schema
            .iter()
            .find(|(num, _, _)| *num == n)
            .ok_or_else(|| format!("field {n} is not supported here"))?;
        let name = name.to_string();
        // Generated marshallers write empty strings and zero numbers too;
        // JSON would omit them.
        match (f, wire) {
            (F::Skip, 0) => {
                r.varint()?;
            }
            (F::Skip, 2) => {
                r.bytes()?;
            }
            (F::Int, 0) => {
                let v = r.varint()? as i64;
                if v != 0 {
                    out.insert(name, json!(v));
                }
            }
            (F::Bool, 0) => {
                out.insert(name, json!(r.varint()? != 0));
            }
            (F::Str, 2) => {
                let t = text(r.bytes()?)?;
                if !t.is_empty() {
                    out.insert(name, json!(t));
                }
            }
            (F::Msg(s), 2) => {
                out.insert(name, message(r.bytes()?, s)?);
            }
            (F::MapStr | F::MapBytes, 2) => {
                let (k, v) = entry(r.bytes()?, matches!(f, F::MapBytes))?;
                let m = out.entry(name).or_insert_with(|| json!({}));
                m[k] = v;
            }
            (F::RepStr, 2) => {
                let s = text(r.bytes()?)?;
                push(&mut out, name, json!(s));
            }
            (F::RepMsg(s), 2) => {
                let v = message(r.bytes()?, s)?;
                push(&mut out, name, v);
            }
            _ => return Err(format!("field {n} has wire type {wire}")),
        }
    }
    Ok(Value::Object(out))
}

fn push(out: &mut Map<String, Value>, name: String, v: Value) {
    if let Value::Array(a) = out.entry(name).or_insert_with(|| json!([])) {
        a.push(v);
    }
}

/// Decode a protobuf request body into the JSON object it stands for.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let raw = body
        .strip_prefix(b"k8s\x00")
        .ok_or("no k8s protobuf envelope")?;
    let mut r = Reader { b: raw };
    let (mut api_version, mut kind, mut inner) = (String::new(), String::new(), None);
    while let Some((n, _)) = r.tag()? {
        let f = r.bytes()?;
        match n {
            1 => {
                let tm = message(f, &[(1, "apiVersion", F::Str), (2, "kind", F::Str)])?;
                api_version = tm["apiVersion"].as_str().unwrap_or_default().into();
                kind = tm["kind"].as_str().unwrap_or_default().into();
            }
            2 => inner = Some(f),
            3 | 4 => {}
            _ => return Err(format!("envelope field {n}")),
        }
    }
    let schema = match (api_version.as_str(), kind.as_str()) {
        ("v1", "ConfigMap") => CONFIG_MAP,
        ("v1", "Secret") => SECRET,
        ("v1", "Namespace") => NAMESPACE,
        ("v1", "ServiceAccount") => SERVICE_ACCOUNT,
        ("rbac.authorization.k8s.io/v1", "Role") => ROLE,
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => CLUSTER_ROLE,
        ("rbac.authorization.k8s.io/v1", "RoleBinding" | "ClusterRoleBinding") => BINDING,
        _ => return Err(format!("{api_version} {kind} in protobuf is not supported")),
    };
    let mut v = message(inner.unwrap_or_default(), schema)?;
    v["apiVersion"] = json!(api_version);
    v["kind"] = json!(kind);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(n: u64, b: &[u8]) -> Vec<u8> {
        let mut out = vec![((n << 3) | 2) as u8, b.len() as u8];
        out.extend_from_slice(b);
        out
    }

    #[test]
    fn config_map() {
        let meta = [
            field(1, b"cfg"),
            field(11, &[field(1, b"a"), field(2, b"b")].concat()),
        ]
        .concat();
        let cm = [
            field(1, &meta),
            field(2, &[field(1, b"k"), field(2, b"v")].concat()),
        ]
        .concat();
        let tm = [field(1, b"v1"), field(2, b"ConfigMap")].concat();
        let body = [b"k8s\x00".to_vec(), field(1, &tm), field(2, &cm)].concat();
        let v = decode(&body).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "cfg", "labels": {"a": "b"}}, "data": {"k": "v"}})
        );
    }
}
