//! Discovery: the server's version, its API groups and each group's
//! resources, as kubectl and client-go ask for them before anything else.
use axum::{http::StatusCode, response::Response};
use serde_json::{json, Value};

use super::{group_version, kinds::kinds, ok_json, status};

/// The answer to a discovery path, or `None` for any other path.
pub(super) fn answer(segs: &[&str]) -> Option<Response> {
    match segs {
        ["version"] => Some(ok_json(
            json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-tpbpf-lab", "platform": "linux/amd64"}),
        )),
        ["api"] => Some(ok_json(
            json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
        )),
        ["apis"] => {
            let groups: Vec<Value> = [
                "apps",
                "authentication.k8s.io",
                "authorization.k8s.io",
                "discovery.k8s.io",
                "networking.k8s.io",
                "rbac.authorization.k8s.io",
            ]
                .iter()
                .map(|g| json!({"name": g, "versions": [{"groupVersion": format!("{g}/v1"), "version": "v1"}], "preferredVersion": {"groupVersion": format!("{g}/v1"), "version": "v1"}}))
                .collect();
            Some(ok_json(
                json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
            ))
        }
        ["api", "v1"] => Some(resource_list("", "v1")),
        ["apis", g, v] => Some(resource_list(g, v)),
        _ => None,
    }
}

/// The reviews (create only, not kept): what `kubectl auth can-i`, `auth
/// whoami` and an agent that reviews tokens and rights ask for.
const REVIEWS: &[(&str, &str, &str, bool)] = &[
    (
        "authentication.k8s.io",
        "tokenreviews",
        "TokenReview",
        false,
    ),
    (
        "authentication.k8s.io",
        "selfsubjectreviews",
        "SelfSubjectReview",
        false,
    ),
    (
        "authorization.k8s.io",
        "subjectaccessreviews",
        "SubjectAccessReview",
        false,
    ),
    (
        "authorization.k8s.io",
        "selfsubjectaccessreviews",
        "SelfSubjectAccessReview",
        false,
    ),
];

fn resource_list(group: &str, version: &str) -> Response {
    let kinds = kinds();
    let mut resources: Vec<Value> = kinds
        .iter()
        .filter(|k| k.group == group && k.version == version)
        .map(|k| json!({"name": k.plural, "singularName": k.kind.to_lowercase(), "namespaced": k.namespaced, "kind": k.kind, "verbs": ["get", "list", "watch"], "shortNames": k.short}))
        .collect();
    if version == "v1" {
        resources.extend(
            REVIEWS
                .iter()
                .filter(|(g, ..)| *g == group)
                .map(|(_, plural, kind, namespaced)| json!({"name": plural, "singularName": kind.to_lowercase(), "namespaced": namespaced, "kind": kind, "verbs": ["create"]})),
        );
    }
    if resources.is_empty() {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no API group {group}/{version}"),
        );
    }
    if group.is_empty() {
        resources.push(json!({"name": "pods/portforward", "singularName": "", "namespaced": true, "kind": "PodPortForwardOptions", "verbs": ["create", "get"]}));
        resources.push(json!({"name": "pods/exec", "singularName": "", "namespaced": true, "kind": "PodExecOptions", "verbs": ["create", "get"]}));
    }
    let gv = group_version(group, version);
    ok_json(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}
