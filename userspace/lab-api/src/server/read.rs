//! Reads: a get, a list (label and field selectors, a table when kubectl
//! asks for one) or a watch of one kind, from what the lab runs and what
//! was applied to it.
use std::collections::HashMap;

use axum::{
    http::{HeaderMap, StatusCode},
    response::Response,
};
use serde_json::{json, Value};

use super::{
    group_version,
    kinds::Kind,
    ok_json,
    selectors::matches_selectors,
    status,
    table::{table, wants_table},
    watch::watch,
    Live,
};
use crate::store::Store;

/// A GET of `kind` in `namespace` (all of them when `None`): the object
/// `name`, or the list, or its watch (`watch=true`).
// The request's parts, as the router took them apart.
#[allow(clippy::too_many_arguments)]
pub(super) fn read(
    lab: &str,
    kind: &Kind,
    group: &str,
    version: &str,
    namespace: Option<&str>,
    name: Option<&str>,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Response {
    let objects = kind.objects;
    let (lab, ns, q) = (
        lab.to_string(),
        namespace.map(str::to_string),
        query.clone(),
    );
    let poll = move || -> Vec<Value> {
        let live = Live {
            status: tpbpf_lab::Lab::new(&lab).status(),
            store: Store::new(&lab),
        };
        objects(&live)
            .into_iter()
            .filter(|o| ns.is_none() || o["metadata"]["namespace"].as_str() == ns.as_deref())
            .filter(|o| matches_selectors(o, &q))
            .collect()
    };
    let items = poll();
    if let Some(name) = name {
        return match items.into_iter().find(|o| o["metadata"]["name"] == name) {
            Some(o) => respond_one(o, kind, headers),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} \"{name}\" not found", kind.plural),
            ),
        };
    }
    let watching = query.get("watch").is_some_and(|w| w == "1" || w == "true");
    if watching {
        // From the start (no resourceVersion, or 0): every object as ADDED
        // first. From a list's version: only what changes after it.
        let initial = query
            .get("resourceVersion")
            .is_none_or(|rv| rv.is_empty() || rv == "0");
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(300u64)
            .min(1800);
        return watch(items, initial, poll, timeout);
    }
    if wants_table(headers) {
        return ok_json(table(kind, &items));
    }
    ok_json(json!({
        "kind": format!("{}List", kind.kind),
        "apiVersion": group_version(group, version),
        "metadata": {"resourceVersion": "1"},
        "items": items,
    }))
}

fn respond_one(o: Value, kind: &Kind, headers: &HeaderMap) -> Response {
    if wants_table(headers) {
        return ok_json(table(kind, &[o]));
    }
    ok_json(o)
}
