//! Label and field selectors, as the API server reads them.
use std::collections::HashMap;

use serde_json::Value;

/// `labelSelector=a=b,c=d` and `fieldSelector=metadata.name=x,spec.nodeName=y`
/// (equality only, which is what tpbpf and kubectl's common uses need).
pub(super) fn matches_selectors(o: &Value, query: &HashMap<String, String>) -> bool {
    if let Some(sel) = query.get("labelSelector").filter(|s| !s.is_empty()) {
        let labels = &o["metadata"]["labels"];
        if !selector_terms(sel).iter().all(|t| label_term(t, labels)) {
            return false;
        }
    }
    if let Some(sel) = query.get("fieldSelector").filter(|s| !s.is_empty()) {
        for term in sel.split(',') {
            let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) else {
                continue;
            };
            let mut cur = o;
            for part in k.trim().split('.') {
                cur = &cur[part];
            }
            if cur.as_str() != Some(v.trim()) {
                return false;
            }
        }
    }
    true
}

/// A label selector's terms: split at commas outside `( )`.
fn selector_terms(sel: &str) -> Vec<String> {
    let (mut terms, mut cur, mut depth) = (Vec::new(), String::new(), 0u32);
    for c in sel.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    terms.push(cur);
    terms
        .into_iter()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

/// One term, equality- or set-based, as the API server reads it:
/// `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`.
fn label_term(term: &str, labels: &Value) -> bool {
    let get = |k: &str| labels[k.trim()].as_str();
    let set = |rest: &str| -> Vec<String> {
        rest.trim()
            .trim_start_matches('(')
            .trim_end_matches(')')
            .split(',')
            .map(|v| v.trim().to_string())
            .collect()
    };
    if let Some((k, rest)) = term.split_once(" notin ") {
        return get(k).is_none_or(|v| !set(rest).iter().any(|s| s == v));
    }
    if let Some((k, rest)) = term.split_once(" in ") {
        return get(k).is_some_and(|v| set(rest).iter().any(|s| s == v));
    }
    if let Some((k, v)) = term.split_once("!=") {
        return get(k) != Some(v.trim());
    }
    if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return get(k) == Some(v.trim());
    }
    match term.strip_prefix('!') {
        Some(k) => get(k).is_none(),
        None => get(term).is_some(),
    }
}
