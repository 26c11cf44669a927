//! Field ownership for server-side apply: `metadata.managedFields` entries
//! hold FieldsV1 sets (`f:name`, `k:{"name":"c"}`, `v:"x"`, `.`), built
//! with the same list strategies as strategic merge patch (listMapKeys of
//! built-in types coincide with their patchMergeKeys for the fields here;
//! custom resources' lists are atomic, as without x-kubernetes-list-type).

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use super::resources::{list_kind, ListKind, ResourceDef};
use super::status::ApiError;

/// One element per path step, as FieldsV1 spells it.
pub type FieldPath = Vec<String>;
pub type FieldSet = BTreeSet<FieldPath>;

/// Identity and server-owned metadata: never anyone's field.
const SERVER_META: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// The fields `v` sets. `status` says whether .status counts (it does only
/// for the status subresource of types that have one, or types without).
pub fn fieldset(def: &ResourceDef, v: &Value, status: Option<bool>) -> FieldSet {
    let mut out = FieldSet::new();
    let Some(m) = v.as_object() else {
        return out;
    };
    for (k, child) in m {
        if k == "apiVersion" || k == "kind" {
            continue;
        }
        if k == "status" && status == Some(false)
            || k != "status" && status == Some(true) && k != "metadata"
        {
            continue;
        }
        if k == "metadata" {
            if status == Some(true) {
                continue;
            }
            if let Some(meta) = child.as_object() {
                for (mk, mv) in meta {
                    if SERVER_META.contains(&mk.as_str()) {
                        continue;
                    }
                    walk(
                        def,
                        &mut vec!["metadata", mk],
                        &mut vec!["f:metadata".into(), format!("f:{mk}")],
                        mv,
                        &mut out,
                    );
                }
            }
            continue;
        }
        walk(
            def,
            &mut vec![k],
            &mut vec![format!("f:{k}")],
            child,
            &mut out,
        );
    }
    out
}

fn item_key(key: &str, v: &Value) -> String {
    format!("k:{}", json!({ key: v }))
}

fn walk<'a>(
    def: &ResourceDef,
    names: &mut Vec<&'a str>,
    path: &mut FieldPath,
    v: &'a Value,
    out: &mut FieldSet,
) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                names.push(k);
                path.push(format!("f:{k}"));
                walk(def, names, path, child, out);
                path.pop();
                names.pop();
            }
        }
        Value::Array(items) => match list_kind(def, names) {
            ListKind::Map(key) if items.iter().all(|e| e.get(key).is_some()) => {
                for e in items {
                    path.push(item_key(key, &e[key]));
                    let mut me = path.clone();
                    me.push(".".into());
                    out.insert(me);
                    walk(def, names, path, e, out);
                    path.pop();
                }
            }
            ListKind::Set => {
                for e in items {
                    let mut p = path.clone();
                    p.push(format!("v:{e}"));
                    out.insert(p);
                }
            }
            _ => {
                out.insert(path.clone());
            }
        },
        _ => {
            out.insert(path.clone());
        }
    }
}

/// Find a list element by a `k:` or `v:` step.
fn find_item(list: &[Value], step: &str) -> Option<usize> {
    if let Some(k) = step.strip_prefix("k:") {
        let want: Map<String, Value> = serde_json::from_str(k).ok()?;
        list.iter()
            .position(|e| want.iter().all(|(f, v)| e.get(f) == Some(v)))
    } else if let Some(v) = step.strip_prefix("v:") {
        let want: Value = serde_json::from_str(v).ok()?;
        list.iter().position(|e| *e == want)
    } else {
        None
    }
}

pub fn value_at<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut v = obj;
    for step in path {
        if step == "." {
            return Some(v);
        }
        v = if let Some(f) = step.strip_prefix("f:") {
            v.get(f)?
        } else {
            let list = v.as_array()?;
            &list[find_item(list, step)?]
        };
    }
    Some(v)
}

/// Remove the field or list item a path names.
pub fn remove_at(obj: &mut Value, path: &[String]) {
    let path = match path.last().map(String::as_str) {
        Some(".") => &path[..path.len() - 1],
        _ => path,
    };
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut v = obj;
    for step in parents {
        let next = if let Some(f) = step.strip_prefix("f:") {
            v.get_mut(f)
        } else {
            match v.as_array_mut() {
                Some(list) => match find_item(list, step) {
                    Some(i) => list.get_mut(i),
                    None => None,
                },
                None => None,
            }
        };
        match next {
            Some(n) => v = n,
            None => return,
        }
    }
    if let Some(f) = last.strip_prefix("f:") {
        if let Some(m) = v.as_object_mut() {
            m.remove(f);
        }
    } else if let Some(list) = v.as_array_mut() {
        if let Some(i) = find_item(list, last) {
            list.remove(i);
        }
    }
}

/// A set as a FieldsV1 tree.
pub fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut node = &mut root;
        for step in path {
            node = node
                .entry(step.clone())
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
                .expect("tree nodes are objects");
        }
    }
    Value::Object(root)
}

pub fn from_fields_v1(tree: &Value) -> FieldSet {
    fn go(node: &Map<String, Value>, path: &mut FieldPath, out: &mut FieldSet) {
        for (k, child) in node {
            path.push(k.clone());
            match child.as_object() {
                Some(m) if !m.is_empty() => go(m, path, out),
                _ => {
                    out.insert(path.clone());
                }
            }
            path.pop();
        }
    }
    let mut out = FieldSet::new();
    if let Some(m) = tree.as_object() {
        go(m, &mut vec![], &mut out);
    }
    out
}

/// `.spec.containers[name="a"].image`, as conflict messages show paths.
pub fn render(path: &[String]) -> String {
    let mut s = String::new();
    for step in path {
        if let Some(f) = step.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = step.strip_prefix("k:") {
            let m: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            let parts: Vec<String> = m.iter().map(|(f, v)| format!("{f}={v}")).collect();
            s.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(v) = step.strip_prefix("v:") {
            s.push_str(&format!("[={v}]"));
        }
    }
    s
}

#[derive(Debug, Clone)]
pub struct Managed {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub time: String,
    pub subresource: String,
    pub set: FieldSet,
}

pub fn read_managed(obj: &Value) -> Vec<Managed> {
    let s = |e: &Value, k: &str| e[k].as_str().unwrap_or_default().to_string();
    obj["metadata"]["managedFields"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| Managed {
                    manager: s(e, "manager"),
                    operation: s(e, "operation"),
                    api_version: s(e, "apiVersion"),
                    time: s(e, "time"),
                    subresource: s(e, "subresource"),
                    set: from_fields_v1(&e["fieldsV1"]),
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn write_managed(obj: &mut Value, entries: &[Managed]) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.set.is_empty())
        .map(|e| {
            let mut v = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&e.set),
            });
            if !e.subresource.is_empty() {
                v["subresource"] = json!(e.subresource);
            }
            v
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(list));
        }
    }
}

fn status_flag(def: &ResourceDef, subresource: &str) -> Option<bool> {
    if !def.status {
        None
    } else {
        Some(subresource == "status")
    }
}

/// Record a non-apply write by `manager`: the fields it changed become its
/// own and no one else's (what the real field manager does for updates).
pub fn record_update(
    def: &ResourceDef,
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    subresource: &str,
    now: &str,
) {
    let mut entries = old.map(read_managed).unwrap_or_default();
    let flag = status_flag(def, subresource);
    let new_set = fieldset(def, new, flag);
    let changed: FieldSet = match old {
        None => new_set.clone(),
        Some(old) => {
            let old_set = fieldset(def, old, flag);
            new_set
                .iter()
                .filter(|p| value_at(old, p) != value_at(new, p))
                .chain(old_set.difference(&new_set))
                .cloned()
                .collect()
        }
    };
    if changed.is_empty() {
        write_managed(new, &entries);
        return;
    }
    for e in entries.iter_mut() {
        e.set.retain(|p| !changed.contains(p));
    }
    let mine: FieldSet = changed.intersection(&new_set).cloned().collect();
    let pos = entries.iter().position(|e| {
        e.manager == manager && e.operation == "Update" && e.subresource == subresource
    });
    match pos {
        Some(i) => {
            entries[i].set.extend(mine);
            entries[i].set.retain(|p| new_set.contains(p));
            entries[i].time = now.to_string();
            entries[i].api_version = def.api_version();
        }
        None => entries.push(Managed {
            manager: manager.to_string(),
            operation: "Update".into(),
            api_version: def.api_version(),
            time: now.to_string(),
            subresource: subresource.to_string(),
            set: mine,
        }),
    }
    write_managed(new, &entries);
}

/// Merge an applied configuration into an object: maps field by field,
/// keyed lists by key, sets by value, anything else replaced.
fn merge_applied<'a>(
    def: &ResourceDef,
    names: &mut Vec<&'a str>,
    cur: &mut Value,
    applied: &'a Value,
) {
    let Value::Object(a) = applied else {
        *cur = applied.clone();
        return;
    };
    if !cur.is_object() {
        *cur = Value::Object(Map::new());
    }
    let c = cur.as_object_mut().expect("made an object above");
    for (k, av) in a {
        if av.is_null() {
            c.remove(k);
            continue;
        }
        names.push(k);
        let slot = c.entry(k.clone()).or_insert(Value::Null);
        match av {
            Value::Object(_) => merge_applied(def, names, slot, av),
            Value::Array(items) => match list_kind(def, names) {
                ListKind::Map(key) if items.iter().all(|e| e.get(key).is_some()) => {
                    let mut list = slot.as_array().cloned().unwrap_or_default();
                    for e in items {
                        match list.iter().position(|x| x.get(key) == e.get(key)) {
                            Some(i) => merge_applied(def, names, &mut list[i], e),
                            None => list.push(e.clone()),
                        }
                    }
                    *slot = Value::Array(list);
                }
                ListKind::Set => {
                    let mut list = slot.as_array().cloned().unwrap_or_default();
                    for e in items {
                        if !list.contains(e) {
                            list.push(e.clone());
                        }
                    }
                    *slot = Value::Array(list);
                }
                _ => *slot = av.clone(),
            },
            _ => *slot = av.clone(),
        }
        names.pop();
    }
}

/// Server-side apply of `applied` by `manager` onto `current` (None:
/// create). Returns the new object with its managedFields.
pub fn apply(
    def: &ResourceDef,
    current: Option<&Value>,
    applied: &Value,
    manager: &str,
    subresource: &str,
    force: bool,
    now: &str,
) -> Result<Value, ApiError> {
    let flag = status_flag(def, subresource);
    let set = fieldset(def, applied, flag);
    let mut obj = current.cloned().unwrap_or_else(|| json!({"metadata": {}}));
    let mut entries = current.map(read_managed).unwrap_or_default();
    let is_me = |e: &Managed| {
        e.manager == manager && e.operation == "Apply" && e.subresource == subresource
    };

    let mut conflicts: Vec<(String, String)> = vec![];
    for e in entries.iter_mut().filter(|e| !is_me(e)) {
        if e.subresource != subresource {
            continue;
        }
        let clash: Vec<FieldPath> = e
            .set
            .intersection(&set)
            .filter(|p| p.last().map(String::as_str) != Some("."))
            .filter(|p| value_at(&obj, p) != value_at(applied, p))
            .cloned()
            .collect();
        if force {
            e.set.retain(|p| !clash.contains(p));
        } else {
            conflicts.extend(clash.iter().map(|p| (e.manager.clone(), render(p))));
        }
    }
    if !conflicts.is_empty() {
        let n = conflicts.len();
        let list: Vec<String> = conflicts
            .iter()
            .map(|(m, f)| format!("conflict with \"{m}\": {f}"))
            .collect();
        let mut err = ApiError::new(
            409,
            "Conflict",
            format!(
                "Apply failed with {n} conflict{}: {}",
                if n == 1 { "" } else { "s" },
                list.join("\n")
            ),
        );
        err.details = Some(json!({
            "name": applied["metadata"]["name"],
            "group": def.group,
            "kind": def.plural,
            "causes": conflicts.iter().map(|(m, f)| json!({
                "reason": "FieldManagerConflict",
                "message": format!("conflict with \"{m}\""),
                "field": f,
            })).collect::<Vec<_>>(),
        }));
        return Err(err);
    }

    // Fields this manager applied before and applies no more go, unless
    // another manager owns them too. Deepest first, so an item's own
    // fields go before the item.
    let others: FieldSet = entries
        .iter()
        .filter(|e| !is_me(e))
        .flat_map(|e| e.set.iter().cloned())
        .collect();
    if let Some(prev) = entries.iter().find(|e| is_me(e)) {
        let mut gone: Vec<&FieldPath> = prev
            .set
            .iter()
            .filter(|p| !set.contains(*p) && !others.contains(*p))
            .collect();
        gone.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in gone {
            remove_at(&mut obj, p);
        }
    }
    let mut body = applied.clone();
    if let Some(m) = body.as_object_mut() {
        m.remove("apiVersion");
        m.remove("kind");
        if flag == Some(true) {
            m.retain(|k, _| k == "status");
        } else if flag == Some(false) {
            m.remove("status");
        }
    }
    if let Some(meta) = body.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in SERVER_META {
            meta.remove(*k);
        }
    }
    merge_applied(def, &mut vec![], &mut obj, &body);

    entries.retain(|e| !e.set.is_empty() || is_me(e));
    let mine = Managed {
        manager: manager.to_string(),
        operation: "Apply".into(),
        api_version: def.api_version(),
        time: now.to_string(),
        subresource: subresource.to_string(),
        set,
    };
    match entries.iter().position(is_me) {
        Some(i) => entries[i] = mine,
        None => entries.push(mine),
    }
    write_managed(&mut obj, &entries);
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::resources::builtins;

    fn cm() -> ResourceDef {
        builtins()
            .into_iter()
            .find(|d| d.plural == "configmaps")
            .unwrap()
    }

    #[test]
    fn apply_owns_and_releases() {
        let d = cm();
        let a1 = json!({"metadata": {"name": "x", "labels": {"a": "1"}}, "data": {"k": "v", "gone": "soon"}});
        let o = apply(&d, None, &a1, "one", "", false, "t").unwrap();
        let a2 = json!({"metadata": {"name": "x"}, "data": {"k": "v"}});
        let o = apply(&d, Some(&o), &a2, "one", "", false, "t").unwrap();
        assert_eq!(o["data"], json!({"k": "v"}));
        assert!(o["metadata"]["labels"].get("a").is_none());
        // Another manager setting k differently conflicts; forced, it owns k.
        let a3 = json!({"metadata": {"name": "x"}, "data": {"k": "w"}});
        let e = apply(&d, Some(&o), &a3, "two", "", false, "t").unwrap_err();
        assert_eq!(e.code, 409);
        let o = apply(&d, Some(&o), &a3, "two", "", true, "t").unwrap();
        assert_eq!(o["data"]["k"], "w");
        let m = read_managed(&o);
        assert!(m.iter().all(|e| e.manager == "two"), "{m:?}");
        let tree = to_fields_v1(&m[0].set);
        assert_eq!(from_fields_v1(&tree), m[0].set);
    }
}
