//! Server-side tables (`meta.k8s.io/v1` `Table`), as kubectl asks for them.
use axum::http::{header, HeaderMap};
use serde_json::{json, Value};

use super::kinds::Kind;

pub(super) fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"))
}

/// Computes a table row's cells from an object.
type CellsFn = Box<dyn Fn(&Value) -> Vec<Value>>;

/// A server-side table (meta.k8s.io/v1), as kubectl asks for.
pub(super) fn table(kind: &Kind, items: &[Value]) -> Value {
    let col = |name: &str, ty: &str| json!({"name": name, "type": ty, "format": if name == "Name" {"name"} else {""}, "description": name, "priority": 0});
    let (columns, cells): (Vec<Value>, CellsFn) = match kind.plural {
        "pods" => (
            vec![
                col("Name", "string"),
                col("Ready", "string"),
                col("Status", "string"),
                col("Restarts", "integer"),
                col("Age", "string"),
                col("IP", "string"),
                col("Node", "string"),
            ],
            Box::new(|o: &Value| {
                let statuses = o["status"]["containerStatuses"].as_array();
                let total = o["spec"]["containers"].as_array().map_or(0, Vec::len);
                let ready = statuses
                    .into_iter()
                    .flatten()
                    .filter(|c| c["ready"] == true)
                    .count();
                let restarts: i64 = statuses
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c["restartCount"].as_i64())
                    .sum();
                // kubectl's STATUS: a waiting container's reason, else the phase.
                let shown = statuses
                    .into_iter()
                    .flatten()
                    .find_map(|c| c["state"]["waiting"]["reason"].as_str().map(|r| json!(r)))
                    .unwrap_or_else(|| o["status"]["phase"].clone());
                vec![
                    o["metadata"]["name"].clone(),
                    json!(format!("{ready}/{total}")),
                    shown,
                    json!(restarts),
                    json!("lab"),
                    o["status"]["podIP"].clone(),
                    o["spec"]["nodeName"].clone(),
                ]
            }),
        ),
        "services" => (
            vec![
                col("Name", "string"),
                col("Type", "string"),
                col("Cluster-IP", "string"),
                col("Ports", "string"),
                col("Age", "string"),
            ],
            Box::new(|o: &Value| {
                let ports: Vec<String> = o["spec"]["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("TCP")))
                    .collect();
                vec![
                    o["metadata"]["name"].clone(),
                    o["spec"]["type"].clone(),
                    o["spec"]["clusterIP"].clone(),
                    json!(ports.join(",")),
                    json!("lab"),
                ]
            }),
        ),
        _ => (
            vec![col("Name", "string"), col("Age", "string")],
            Box::new(|o: &Value| vec![o["metadata"]["name"].clone(), json!("lab")]),
        ),
    };
    let rows: Vec<Value> = items
        .iter()
        .map(|o| json!({"cells": cells(o), "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}}))
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": "1"}, "columnDefinitions": columns, "rows": rows})
}
