//! Label and field selectors, in the syntax of k8s.io/apimachinery's
//! `labels.Parse` and `fields.ParseSelector`.

use std::collections::BTreeMap;

use serde_json::Value;

use super::resources::{selectable_fields, ResourceDef};
use super::status::{ApiError, ApiResult};

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Eq,
    NotEq,
    In,
    NotIn,
    Exists,
    NotExists,
    Gt,
    Lt,
}

#[derive(Debug, Clone)]
struct Req {
    key: String,
    op: Op,
    values: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct LabelSelector {
    reqs: Vec<Req>,
}

fn valid_label_key(k: &str) -> bool {
    let name = k.rsplit('/').next().unwrap_or(k);
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        && k.matches('/').count() <= 1
}

impl LabelSelector {
    pub fn parse(s: &str) -> ApiResult<LabelSelector> {
        let bad = |m: &str| {
            ApiError::bad_request(format!(
                "unable to parse requirement: {m} (labelSelector {s:?})"
            ))
        };
        let mut reqs = vec![];
        // Split on commas outside parentheses.
        let mut parts = vec![];
        let (mut depth, mut cur) = (0i32, String::new());
        for c in s.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            if c == ',' && depth == 0 {
                parts.push(std::mem::take(&mut cur));
            } else {
                cur.push(c);
            }
        }
        parts.push(cur);
        for p in parts {
            let p = p.trim();
            if p.is_empty() {
                continue;
            }
            let req = if let Some(k) = p.strip_prefix('!') {
                Req {
                    key: k.trim().into(),
                    op: Op::NotExists,
                    values: vec![],
                }
            } else if let Some(i) = p.find("!=") {
                Req {
                    key: p[..i].trim().into(),
                    op: Op::NotEq,
                    values: vec![p[i + 2..].trim().into()],
                }
            } else if let Some(i) = p.find("==") {
                Req {
                    key: p[..i].trim().into(),
                    op: Op::Eq,
                    values: vec![p[i + 2..].trim().into()],
                }
            } else if let Some(i) = p.find('=') {
                Req {
                    key: p[..i].trim().into(),
                    op: Op::Eq,
                    values: vec![p[i + 1..].trim().into()],
                }
            } else if let Some(i) = p.find('>') {
                Req {
                    key: p[..i].trim().into(),
                    op: Op::Gt,
                    values: vec![p[i + 1..].trim().into()],
                }
            } else if let Some(i) = p.find('<') {
                Req {
                    key: p[..i].trim().into(),
                    op: Op::Lt,
                    values: vec![p[i + 1..].trim().into()],
                }
            } else if let Some(open) = p.find('(') {
                let head: Vec<&str> = p[..open].split_whitespace().collect();
                let Some(inner) = p[open + 1..].strip_suffix(')') else {
                    return Err(bad("expected ')'"));
                };
                let op = match head.as_slice() {
                    [_, "in"] => Op::In,
                    [_, "notin"] => Op::NotIn,
                    _ => return Err(bad("expected 'in' or 'notin'")),
                };
                Req {
                    key: head[0].into(),
                    op,
                    values: inner
                        .split(',')
                        .map(|v| v.trim().to_string())
                        .filter(|v| !v.is_empty())
                        .collect(),
                }
            } else {
                if p.contains(char::is_whitespace) {
                    return Err(bad("unexpected whitespace"));
                }
                Req {
                    key: p.into(),
                    op: Op::Exists,
                    values: vec![],
                }
            };
            if !valid_label_key(&req.key) {
                return Err(bad(&format!("invalid label key {:?}", req.key)));
            }
            if matches!(req.op, Op::Gt | Op::Lt) && req.values[0].parse::<i64>().is_err() {
                return Err(bad(
                    "for 'Gt', 'Lt' operators, the value must be an integer",
                ));
            }
            reqs.push(req);
        }
        Ok(LabelSelector { reqs })
    }

    /// From a metav1.LabelSelector object (webhook selectors). None = match
    /// everything.
    pub fn from_object(sel: &Value) -> ApiResult<LabelSelector> {
        let mut reqs = vec![];
        if let Some(m) = sel["matchLabels"].as_object() {
            for (k, v) in m {
                reqs.push(Req {
                    key: k.clone(),
                    op: Op::Eq,
                    values: vec![v.as_str().unwrap_or_default().into()],
                });
            }
        }
        if let Some(exprs) = sel["matchExpressions"].as_array() {
            for e in exprs {
                let op = match e["operator"].as_str().unwrap_or_default() {
                    "In" => Op::In,
                    "NotIn" => Op::NotIn,
                    "Exists" => Op::Exists,
                    "DoesNotExist" => Op::NotExists,
                    o => {
                        return Err(ApiError::bad_request(format!(
                            "{o:?} is not a valid label selector operator"
                        )))
                    }
                };
                reqs.push(Req {
                    key: e["key"].as_str().unwrap_or_default().into(),
                    op,
                    values: e["values"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|v| v.as_str().map(String::from))
                                .collect()
                        })
                        .unwrap_or_default(),
                });
            }
        }
        Ok(LabelSelector { reqs })
    }

    pub fn matches_labels(&self, labels: &BTreeMap<String, String>) -> bool {
        self.reqs.iter().all(|r| {
            let v = labels.get(&r.key);
            match r.op {
                Op::Eq => v == Some(&r.values[0]),
                Op::NotEq => v != Some(&r.values[0]),
                Op::In => v.is_some_and(|v| r.values.contains(v)),
                Op::NotIn => v.is_none_or(|v| !r.values.contains(v)),
                Op::Exists => v.is_some(),
                Op::NotExists => v.is_none(),
                Op::Gt | Op::Lt => {
                    let (Some(Ok(have)), Ok(want)) =
                        (v.map(|v| v.parse::<i64>()), r.values[0].parse::<i64>())
                    else {
                        return false;
                    };
                    if r.op == Op::Gt {
                        have > want
                    } else {
                        have < want
                    }
                }
            }
        })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.matches_labels(&labels_of(obj))
    }
}

pub fn labels_of(obj: &Value) -> BTreeMap<String, String> {
    obj["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Debug, Clone, Default)]
pub struct FieldSelector {
    reqs: Vec<(String, bool, String)>, // field, equal?, value
}

/// Split on unescaped `sep`, keeping escapes for the next stage.
fn split_escaped(s: &str, sep: char) -> Vec<String> {
    let (mut out, mut cur, mut esc) = (vec![], String::new(), false);
    for c in s.chars() {
        if esc {
            cur.push('\\');
            cur.push(c);
            esc = false;
        } else if c == '\\' {
            esc = true;
        } else if c == sep {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

fn unescape(s: &str) -> String {
    let (mut out, mut esc) = (String::new(), false);
    for c in s.chars() {
        if esc || c != '\\' {
            out.push(c);
            esc = false;
        } else {
            esc = true;
        }
    }
    out
}

impl FieldSelector {
    pub fn parse(s: &str, def: &ResourceDef) -> ApiResult<FieldSelector> {
        let mut reqs = vec![];
        for part in split_escaped(s, ',') {
            if part.trim().is_empty() {
                continue;
            }
            let (field, eq, value) = if let Some(i) = part.find("!=") {
                (&part[..i], false, &part[i + 2..])
            } else if let Some(i) = part.find("==") {
                (&part[..i], true, &part[i + 2..])
            } else if let Some(i) = part.find('=') {
                (&part[..i], true, &part[i + 1..])
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{s}'; can't understand '{part}'"
                )));
            };
            let field = field.trim().to_string();
            if field != "metadata.name"
                && field != "metadata.namespace"
                && !selectable_fields(def).contains(&field.as_str())
            {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            reqs.push((field, eq, unescape(value)));
        }
        Ok(FieldSelector { reqs })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.reqs
            .iter()
            .all(|(field, eq, want)| (field_value(obj, field) == *want) == *eq)
    }
}

/// A field's value as the field-label conversion functions render it.
fn field_value(obj: &Value, field: &str) -> String {
    if field == "source" {
        return obj["source"]["component"]
            .as_str()
            .unwrap_or_default()
            .to_string();
    }
    let mut v = obj;
    for p in field.split('.') {
        v = &v[p];
    }
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Null if field == "spec.hostNetwork" || field == "spec.unschedulable" => {
            "false".into()
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors() {
        let o = json!({"metadata": {"labels": {"app": "web", "tier": "1"}}});
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(&o);
        assert!(m("app=web"));
        assert!(m("app==web,tier"));
        assert!(!m("app!=web"));
        assert!(m("app in (web, db)"));
        assert!(!m("app notin (web,db)"));
        assert!(m("!missing"));
        assert!(!m("missing"));
        assert!(m("tier>0"));
        assert!(LabelSelector::parse("app in (web").is_err());
    }
}
