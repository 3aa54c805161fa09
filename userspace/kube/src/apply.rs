//! Installing and removing tpbpf's objects (those `tpbpf-deploy` builds):
//! server-side apply, and deletion.
use kube::{Api, Client};

/// The API resource of an object built by `tpbpf-deploy` (its
/// `apiVersion` and `kind`), and whether it lives in a namespace.
fn resource_of(
    o: &k8s_openapi::serde_json::Value,
) -> Result<(kube::api::ApiResource, bool), String> {
    let api_version = o["apiVersion"].as_str().unwrap_or("");
    let kind = o["kind"].as_str().unwrap_or("");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let (plural, namespaced) = match kind {
        "Namespace" => ("namespaces", false),
        "ServiceAccount" => ("serviceaccounts", true),
        "ClusterRole" => ("clusterroles", false),
        "Role" => ("roles", true),
        "ClusterRoleBinding" => ("clusterrolebindings", false),
        "RoleBinding" => ("rolebindings", true),
        "DaemonSet" => ("daemonsets", true),
        other => return Err(format!("tpbpf does not install {other} objects")),
    };
    let gvk = kube::api::GroupVersionKind::gvk(group, version, kind);
    Ok((
        kube::api::ApiResource::from_gvk_with_plural(&gvk, plural),
        namespaced,
    ))
}

fn dynamic_api(
    client: &Client,
    o: &k8s_openapi::serde_json::Value,
) -> Result<(Api<kube::api::DynamicObject>, String), String> {
    let (ar, namespaced) = resource_of(o)?;
    let name = o["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let api = match (namespaced, o["metadata"]["namespace"].as_str()) {
        (true, Some(ns)) => Api::namespaced_with(client.clone(), ns, &ar),
        _ => Api::all_with(client.clone(), &ar),
    };
    Ok((api, name))
}

/// Applies `objects` (server-side apply, field manager `tpbpf`, taking
/// over fields another manager set): creating what is missing, changing
/// what differs, idempotent.
pub async fn apply(
    client: &Client,
    objects: &[k8s_openapi::serde_json::Value],
) -> Result<(), String> {
    use kube::api::{Patch, PatchParams};
    let params = PatchParams::apply("tpbpf").force();
    for o in objects {
        let (api, name) = dynamic_api(client, o)?;
        api.patch(&name, &params, &Patch::Apply(o))
            .await
            .map_err(|e| format!("applying {} {name}: {e}", o["kind"].as_str().unwrap_or("?")))?;
    }
    Ok(())
}

/// Deletes `objects` (in reverse order), those already gone included.
pub async fn delete(
    client: &Client,
    objects: &[k8s_openapi::serde_json::Value],
) -> Result<(), String> {
    use kube::api::DeleteParams;
    for o in objects.iter().rev() {
        let (api, name) = dynamic_api(client, o)?;
        match api.delete(&name, &DeleteParams::foreground()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                return Err(format!(
                    "deleting {} {name}: {e}",
                    o["kind"].as_str().unwrap_or("?")
                ))
            }
        }
    }
    Ok(())
}
