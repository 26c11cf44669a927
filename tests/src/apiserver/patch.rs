//! The three classic patch formats: JSON merge patch (RFC 7386), JSON
//! patch (RFC 6902) and Kubernetes' strategic merge patch, with the
//! directives k8s.io/apimachinery's `strategicpatch` honours.

use serde_json::{Map, Value};

use super::resources::{list_kind, ListKind, ResourceDef};

/// RFC 7386.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("made an object above");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn unescape_token(t: &str) -> String {
    t.replace("~1", "/").replace("~0", "~")
}

fn tokens(ptr: &str) -> Result<Vec<String>, String> {
    if ptr.is_empty() {
        return Ok(vec![]);
    }
    let Some(rest) = ptr.strip_prefix('/') else {
        return Err(format!("invalid JSON pointer {ptr:?}"));
    };
    Ok(rest.split('/').map(unescape_token).collect())
}

fn index(tok: &str, len: usize, allow_end: bool) -> Result<usize, String> {
    if allow_end && tok == "-" {
        return Ok(len);
    }
    let i: usize = tok
        .parse()
        .map_err(|_| format!("invalid array index {tok:?}"))?;
    if i > len || (!allow_end && i == len) {
        return Err(format!("array index {i} out of bounds"));
    }
    Ok(i)
}

fn get<'a>(doc: &'a Value, toks: &[String]) -> Result<&'a Value, String> {
    let mut v = doc;
    for t in toks {
        v = match v {
            Value::Object(m) => m
                .get(t)
                .ok_or_else(|| format!("missing path element {t:?}"))?,
            Value::Array(a) => &a[index(t, a.len(), false)?],
            _ => return Err(format!("cannot descend into a scalar at {t:?}")),
        };
    }
    Ok(v)
}

fn parent<'a>(doc: &'a mut Value, toks: &[String]) -> Result<&'a mut Value, String> {
    let mut v = doc;
    for t in &toks[..toks.len() - 1] {
        v = match v {
            Value::Object(m) => m
                .get_mut(t)
                .ok_or_else(|| format!("missing path element {t:?}"))?,
            Value::Array(a) => {
                let i = index(t, a.len(), false)?;
                &mut a[i]
            }
            _ => return Err(format!("cannot descend into a scalar at {t:?}")),
        };
    }
    Ok(v)
}

fn add(doc: &mut Value, toks: &[String], value: Value) -> Result<(), String> {
    if toks.is_empty() {
        *doc = value;
        return Ok(());
    }
    let last = &toks[toks.len() - 1];
    match parent(doc, toks)? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
        }
        Value::Array(a) => {
            let i = index(last, a.len(), true)?;
            a.insert(i, value);
        }
        _ => return Err("cannot add to a scalar".into()),
    }
    Ok(())
}

fn remove(doc: &mut Value, toks: &[String]) -> Result<Value, String> {
    let Some(last) = toks.last() else {
        return Err("cannot remove the whole document".into());
    };
    match parent(doc, toks)? {
        Value::Object(m) => m
            .remove(last)
            .ok_or_else(|| format!("missing path element {last:?}")),
        Value::Array(a) => {
            let i = index(last, a.len(), false)?;
            Ok(a.remove(i))
        }
        _ => Err("cannot remove from a scalar".into()),
    }
}

/// RFC 6902, all six operations; the document is untouched on error.
pub fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let Some(ops) = ops.as_array() else {
        return Err("a JSON patch must be an array of operations".into());
    };
    let mut work = doc.clone();
    for op in ops {
        let name = op["op"].as_str().ok_or("operation without \"op\"")?;
        let path = tokens(op["path"].as_str().ok_or("operation without \"path\"")?)?;
        let value = || op.get("value").cloned().ok_or("missing value");
        match name {
            "add" => add(&mut work, &path, value()?)?,
            "remove" => {
                remove(&mut work, &path)?;
            }
            "replace" => {
                remove(&mut work, &path).map_err(|e| format!("replace: {e}"))?;
                add(&mut work, &path, value()?)?;
            }
            "move" => {
                let from = tokens(op["from"].as_str().ok_or("move without \"from\"")?)?;
                let v = remove(&mut work, &from)?;
                add(&mut work, &path, v)?;
            }
            "copy" => {
                let from = tokens(op["from"].as_str().ok_or("copy without \"from\"")?)?;
                let v = get(&work, &from)?.clone();
                add(&mut work, &path, v)?;
            }
            "test" => {
                if *get(&work, &path)? != value()? {
                    return Err(format!(
                        "testing value {} failed",
                        op["path"].as_str().unwrap_or_default()
                    ));
                }
            }
            other => return Err(format!("unexpected kind of operation {other:?}")),
        }
    }
    *doc = work;
    Ok(())
}

/// Drop `$patch`/`$retainKeys`/... directives from a value being stored.
fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(
            a.iter()
                .filter(|e| e.get("$patch").is_none())
                .map(strip_directives)
                .collect(),
        ),
        _ => v.clone(),
    }
}

/// Strategic merge patch of a built-in type. Returns None when the patch
/// deletes the whole value (`$patch: delete`).
pub fn strategic_merge(def: &ResourceDef, orig: &Value, patch: &Value) -> Result<Value, String> {
    Ok(smp(def, &mut vec![], orig, patch)?.unwrap_or(Value::Object(Map::new())))
}

fn smp<'a>(
    def: &ResourceDef,
    path: &mut Vec<&'a str>,
    orig: &Value,
    patch: &'a Value,
) -> Result<Option<Value>, String> {
    let Value::Object(p) = patch else {
        return Ok(Some(patch.clone()));
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => return Ok(Some(strip_directives(patch))),
        Some("delete") => return Ok(None),
        Some("merge") | None => {}
        Some(other) => return Err(format!("unknown patch type: {other}")),
    }
    let mut out = match orig {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    for (k, v) in p {
        if k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            out.remove(k);
            continue;
        }
        path.push(k.as_str());
        let cur = out.get(k).cloned().unwrap_or(Value::Null);
        let merged = match v {
            Value::Object(_) => smp(def, path, &cur, v)?,
            Value::Array(items) => Some(match list_kind(def, path) {
                ListKind::Map(key) => merge_list(def, path, &cur, items, key)?,
                ListKind::Set => {
                    let mut set = cur.as_array().cloned().unwrap_or_default();
                    if items.iter().any(|e| e.get("$patch").is_some()) {
                        set = vec![];
                    }
                    for e in items.iter().filter(|e| e.get("$patch").is_none()) {
                        if !set.contains(e) {
                            set.push(e.clone());
                        }
                    }
                    Value::Array(set)
                }
                ListKind::Atomic => strip_directives(v),
            }),
            _ => Some(v.clone()),
        };
        path.pop();
        match merged {
            Some(m) => {
                out.insert(k.clone(), m);
            }
            None => {
                out.remove(k);
            }
        }
    }
    for (k, v) in p {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(gone)) = (out.get_mut(field), v.as_array()) {
                list.retain(|e| !gone.contains(e));
            }
        } else if let Some(field) = k.strip_prefix("$setElementOrder/") {
            // Put the listed elements first, in the given order, as the
            // client's local order; the rest keep theirs after them.
            if let (Some(Value::Array(list)), Some(order)) = (out.get_mut(field), v.as_array()) {
                let mut sorted = vec![];
                for want in order {
                    if let Some(i) = list.iter().position(|e| same_element(e, want)) {
                        sorted.push(list.remove(i));
                    }
                }
                sorted.append(list);
                *list = sorted;
            }
        }
    }
    if let Some(keep) = p.get("$retainKeys").and_then(Value::as_array) {
        out.retain(|k, _| keep.iter().any(|r| r.as_str() == Some(k)));
    }
    Ok(Some(Value::Object(out)))
}

/// Elements of `$setElementOrder` lists are the merge keys alone.
fn same_element(e: &Value, want: &Value) -> bool {
    match want {
        Value::Object(m) => m.iter().all(|(k, v)| e.get(k) == Some(v)),
        _ => e == want,
    }
}

fn merge_list<'a>(
    def: &ResourceDef,
    path: &mut Vec<&'a str>,
    orig: &Value,
    items: &'a [Value],
    key: &str,
) -> Result<Value, String> {
    if items
        .iter()
        .any(|e| e.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        return Ok(strip_directives(&Value::Array(items.to_vec())));
    }
    let mut out = orig.as_array().cloned().unwrap_or_default();
    for item in items {
        let Some(k) = item.get(key) else {
            if item.is_object() {
                return Err(format!(
                    "map: {item} does not contain declared merge key: {key}"
                ));
            }
            out.push(item.clone());
            continue;
        };
        let pos = out.iter().position(|e| e.get(key) == Some(k));
        match pos {
            Some(i) => match smp(def, path, &out[i], item)? {
                Some(m) => out[i] = m,
                None => {
                    out.remove(i);
                }
            },
            None => {
                if item.get("$patch").and_then(Value::as_str) != Some("delete") {
                    out.push(strip_directives(item));
                }
            }
        }
    }
    Ok(Value::Array(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::resources::builtins;
    use serde_json::json;

    fn pod() -> ResourceDef {
        builtins().into_iter().find(|d| d.plural == "pods").unwrap()
    }

    #[test]
    fn json_patch_ops() {
        let mut d = json!({"a": [1, 2], "b": {"c": 1}});
        json_patch(
            &mut d,
            &json!([
                {"op": "add", "path": "/a/-", "value": 3},
                {"op": "test", "path": "/b/c", "value": 1},
                {"op": "move", "from": "/b/c", "path": "/d"},
                {"op": "replace", "path": "/a/0", "value": 0},
            ]),
        )
        .unwrap();
        assert_eq!(d, json!({"a": [0, 2, 3], "b": {}, "d": 1}));
        assert!(json_patch(&mut d, &json!([{"op": "test", "path": "/d", "value": 2}])).is_err());
    }

    #[test]
    fn strategic_lists() {
        let o = json!({"metadata": {"finalizers": ["a"]}, "spec": {"containers": [
            {"name": "a", "image": "x", "env": [{"name": "A", "value": "1"}]},
            {"name": "b", "image": "y"}]}});
        let p = json!({"metadata": {"finalizers": ["b"]}, "spec": {"containers": [
            {"name": "a", "env": [{"name": "B", "value": "2"}]},
            {"name": "b", "$patch": "delete"},
            {"name": "c", "image": "z"}]}});
        let r = strategic_merge(&pod(), &o, &p).unwrap();
        assert_eq!(r["metadata"]["finalizers"], json!(["a", "b"]));
        assert_eq!(
            r["spec"]["containers"],
            json!([{"name": "a", "image": "x", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
                   {"name": "c", "image": "z"}])
        );
    }
}
