//! What a developer may take, asked of the API server: who the session's
//! client is (a `TokenReview` of its bearer token, or its client
//! certificate checked against the cluster's client CA with its key's
//! signature over the challenge), then whether that user may do what the
//! intercept amounts to (`SubjectAccessReview`s): change the pod (or its
//! workload) to take its traffic; exec into it, or read every secret its
//! containers' environment references, to be given its environment.
use std::net::IpAddr;

use serde_json::{json, Value};
use tpbpf_mux::{Credential, IdentityProof};

use crate::kube_api::Api;

/// What taking a pod's inbound traffic asks (`tpbpf install
/// --intercept-rights`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InterceptRights {
    /// `patch` on the pod: with it, one can set the pod's image to one's
    /// own and take its traffic that way (the default).
    PatchPod,
    /// `patch` on the workload that controls the pod (its Deployment,
    /// StatefulSet or DaemonSet): what injecting a sidecar takes.
    PatchWorkload,
    /// `pods/portforward` on the pod, proven by a port-forward into it
    /// (relaxed: port-forward alone reaches only the pod's listeners).
    PortForward,
}

/// The rule an agent applies, and its API client (or why it has none).
pub struct Rights {
    pub mode: InterceptRights,
    pub api: Result<Api, String>,
}

/// The API client an identity check needs, or what to do without one.
impl Rights {
    pub fn api(&self) -> Result<&Api, String> {
        self.api.as_ref().map_err(|e| {
            format!("the agent cannot ask the API server what you may do ({e}): intercept refused; reinstall with `tpbpf install` (it mounts the agent's service account), or a cluster admin can relax the rule with `tpbpf install --intercept-rights port-forward`")
        })
    }
}

/// The user an identity proof stands for, as the API server knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserInfo {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: Value,
}

/// What a checked client may have.
pub struct Granted {
    pub user: String,
    /// The environment, or why it is withheld.
    pub env: Result<(), String>,
}

/// A Kubernetes name as a path segment: DNS-1123 characters only, so a
/// name from the client can never change the request's path.
fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

fn message(v: &Value) -> String {
    v["message"].as_str().unwrap_or("no message").to_string()
}

/// Who `proof` stands for.
pub async fn authenticate(
    api: &Api,
    proof: &IdentityProof,
    nonce: &[u8; 16],
) -> Result<UserInfo, String> {
    match &proof.credential {
        Credential::Token(token) => {
            let review = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}});
            let (code, answer) = api
                .post("/apis/authentication.k8s.io/v1/tokenreviews", &review)
                .await?;
            if code != 201 && code != 200 {
                return Err(format!("the API server refused the agent's TokenReview ({code}: {}): does the agent's ClusterRole allow creating tokenreviews? (`tpbpf install` applies it)", message(&answer)));
            }
            let status = &answer["status"];
            if status["authenticated"] != true {
                return Err(format!(
                    "the API server does not know the session's token ({})",
                    status["error"].as_str().unwrap_or("not authenticated")
                ));
            }
            let user = &status["user"];
            Ok(UserInfo {
                username: user["username"].as_str().unwrap_or_default().to_string(),
                uid: user["uid"].as_str().unwrap_or_default().to_string(),
                groups: user["groups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect(),
                extra: user["extra"].clone(),
            })
        }
        Credential::Certificate {
            chain,
            scheme,
            signature,
        } => {
            // The client CA, as an aggregated API server reads it.
            let (code, cm) = api
                .get("/api/v1/namespaces/kube-system/configmaps/extension-apiserver-authentication")
                .await?;
            let ca = cm["data"]["client-ca-file"].as_str().unwrap_or_default();
            if code != 200 || ca.is_empty() {
                return Err(format!("the agent cannot read the cluster's client CA (kube-system/extension-apiserver-authentication: {code} {}), so it cannot check a client certificate", message(&cm)));
            }
            let msg = tpbpf_mux::identity_message(nonce, &proof.namespace, &proof.pod);
            let (username, mut groups) =
                tpbpf_mux::x509::verify_client(chain, ca, *scheme, &msg, signature)?;
            groups.push("system:authenticated".into());
            Ok(UserInfo {
                username,
                uid: String::new(),
                groups,
                extra: Value::Null,
            })
        }
    }
}

/// Whether `user` may `verb` `resource[/sub]` `name` in `namespace`.
async fn may(
    api: &Api,
    user: &UserInfo,
    verb: &str,
    (group, resource, sub): (&str, &str, &str),
    namespace: &str,
    name: &str,
) -> Result<bool, String> {
    let mut spec = json!({
        "user": user.username,
        "groups": user.groups,
        "resourceAttributes": {"namespace": namespace, "verb": verb, "group": group, "resource": resource, "subresource": sub, "name": name},
    });
    if !user.uid.is_empty() {
        spec["uid"] = json!(user.uid);
    }
    if user.extra.is_object() {
        spec["extra"] = user.extra.clone();
    }
    let review = json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec});
    let (code, answer) = api
        .post(
            "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            &review,
        )
        .await?;
    if code != 201 && code != 200 {
        return Err(format!("the API server refused the agent's SubjectAccessReview ({code}: {}): does the agent's ClusterRole allow creating subjectaccessreviews? (`tpbpf install` applies it)", message(&answer)));
    }
    Ok(answer["status"]["allowed"] == true)
}

/// `kind/name` of the workload that controls `pod` (a Deployment through
/// its ReplicaSet, a StatefulSet, a DaemonSet), if any.
async fn workload_of(
    api: &Api,
    namespace: &str,
    pod: &Value,
) -> Result<Option<(String, String)>, String> {
    let controller = |obj: &Value| -> Option<(String, String)> {
        obj["metadata"]["ownerReferences"]
            .as_array()?
            .iter()
            .find(|o| o["controller"] == true)
            .map(|o| {
                (
                    o["kind"].as_str().unwrap_or_default().to_string(),
                    o["name"].as_str().unwrap_or_default().to_string(),
                )
            })
    };
    let Some((kind, name)) = controller(pod) else {
        return Ok(None);
    };
    if kind == "ReplicaSet" && name_ok(&name) {
        let (code, rs) = api
            .get(&format!(
                "/apis/apps/v1/namespaces/{namespace}/replicasets/{name}"
            ))
            .await?;
        if code != 200 {
            return Err(format!(
                "the agent cannot read ReplicaSet {namespace}/{name} ({code}: {})",
                message(&rs)
            ));
        }
        return Ok(controller(&rs).or(Some((kind, name))));
    }
    Ok(Some((kind, name)))
}

fn plural(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "Deployment" => "deployments",
        "StatefulSet" => "statefulsets",
        "DaemonSet" => "daemonsets",
        "ReplicaSet" => "replicasets",
        _ => return None,
    })
}

/// The secrets the pod's containers' environment references.
fn env_secrets(pod: &Value) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for c in pod["spec"]["containers"].as_array().into_iter().flatten() {
        for e in c["env"].as_array().into_iter().flatten() {
            if let Some(n) = e["valueFrom"]["secretKeyRef"]["name"].as_str() {
                names.push(n.into());
            }
        }
        for e in c["envFrom"].as_array().into_iter().flatten() {
            if let Some(n) = e["secretRef"]["name"].as_str() {
                names.push(n.into());
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

/// The user `proof` names, as the API server knows it, and the pod
/// `proof.namespace/proof.pod` it names, which must have address `ip`.
async fn identify(
    api: &Api,
    proof: &IdentityProof,
    nonce: &[u8; 16],
    ip: IpAddr,
) -> Result<(UserInfo, Value), String> {
    let (ns, name) = (proof.namespace.as_str(), proof.pod.as_str());
    if !name_ok(ns) || !name_ok(name) {
        return Err(format!("{ns}/{name} is not a pod's name"));
    }
    let user = authenticate(api, proof, nonce).await?;
    let (code, pod) = api
        .get(&format!("/api/v1/namespaces/{ns}/pods/{name}"))
        .await?;
    if code != 200 {
        return Err(format!(
            "the agent cannot read pod {ns}/{name} ({code}: {})",
            message(&pod)
        ));
    }
    // `status.podIPs[]`, and `status.podIP`.
    #[derive(serde::Deserialize)]
    struct PodIp {
        ip: String,
    }
    let listed: Vec<PodIp> =
        serde_json::from_value(pod["status"]["podIPs"].clone()).unwrap_or_default();
    let ips: Vec<&str> = listed
        .iter()
        .map(|p| p.ip.as_str())
        .chain(pod["status"]["podIP"].as_str())
        .collect();
    if !ips.iter().any(|a| a.parse::<IpAddr>().ok() == Some(ip)) {
        return Err(format!(
            "pod {ns}/{name} does not have address {ip}: intercept refused"
        ));
    }
    Ok((user, pod))
}

/// Checks that the user `proof` names may intercept pod
/// `proof.namespace/proof.pod`, which has address `ip`, under `rights`;
/// and whether it may be given the pod's environment.
pub async fn check(
    api: &Api,
    rights: InterceptRights,
    proof: &IdentityProof,
    nonce: &[u8; 16],
    ip: IpAddr,
) -> Result<Granted, String> {
    let (ns, name) = (proof.namespace.as_str(), proof.pod.as_str());
    let (user, pod) = identify(api, proof, nonce, ip).await?;
    let who = &user.username;
    let (verb, target, what, kind_name) = match rights {
        InterceptRights::PatchPod | InterceptRights::PortForward => {
            let (verb, sub) = if rights == InterceptRights::PortForward {
                ("create", "portforward")
            } else {
                ("patch", "")
            };
            (verb, ("", "pods", sub), "the pod", name.to_string())
        }
        InterceptRights::PatchWorkload => match workload_of(api, ns, &pod).await? {
            Some((kind, wname)) if plural(&kind).is_some() && name_ok(&wname) => (
                "patch",
                ("apps", plural(&kind).unwrap_or_default(), ""),
                "the pod's workload",
                wname,
            ),
            _ => (
                "patch",
                ("", "pods", ""),
                "the pod (it has no workload)",
                name.to_string(),
            ),
        },
    };
    if !may(api, &user, verb, target, ns, &kind_name).await? {
        let resource = if target.2.is_empty() {
            target.1.to_string()
        } else {
            format!("{}/{}", target.1, target.2)
        };
        return Err(format!(
            "{who} may not {verb} {resource} {ns}/{kind_name}, which intercepting {ns}/{name} takes (the right to change {what}; `kubectl auth can-i {verb} {resource}/{kind_name} -n {ns}` says the same): ask for that right, or a cluster admin can change the rule with `tpbpf install --intercept-rights`"
        ));
    }
    Ok(Granted {
        user: user.username.clone(),
        env: env_right(api, &user, ns, name, &pod).await?,
    })
}

/// Whether the user `proof` names may have the environment of the pod it
/// names (address `ip`), when another proof (a port-forward) let the
/// intercept itself through. The inner `Err` says why it is withheld; the
/// outer, that the identity or the pod did not check out.
pub async fn env_only(
    api: &Api,
    proof: &IdentityProof,
    nonce: &[u8; 16],
    ip: IpAddr,
) -> Result<Result<(), String>, String> {
    let (ns, name) = (proof.namespace.as_str(), proof.pod.as_str());
    let (user, pod) = identify(api, proof, nonce, ip).await?;
    env_right(api, &user, ns, name, &pod).await
}

/// What reading pod `ns/name`'s environment asks: `create pods/exec` on
/// it, or `get` on every secret its containers' variables reference.
/// The inner `Err` says why it is withheld; the outer, that the API
/// server could not be asked.
async fn env_right(
    api: &Api,
    user: &UserInfo,
    ns: &str,
    name: &str,
    pod: &Value,
) -> Result<Result<(), String>, String> {
    let who = &user.username;
    Ok(
        if may(api, user, "create", ("", "pods", "exec"), ns, name).await? {
            Ok(())
        } else {
            let secrets = env_secrets(pod);
            let mut missing = Vec::new();
            for s in &secrets {
                if !may(api, user, "get", ("", "secrets", ""), ns, s).await? {
                    missing.push(s.clone());
                }
            }
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!(
                "the environment of {ns}/{name} is withheld: {who} may neither exec into the pod (create pods/exec) nor get the secrets it references ({})",
                missing.join(", ")
            ))
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_cannot_change_the_path() {
        assert!(name_ok("web-7d4b9c-a1"));
        assert!(name_ok("my.pod"));
        for bad in [
            "",
            "a/b",
            "a?watch=1",
            "..%2f",
            "A",
            "a b",
            &"x".repeat(254),
        ] {
            assert!(!name_ok(bad), "{bad}");
        }
    }

    #[test]
    fn the_secrets_of_env_and_env_from_are_found_once_each() {
        let pod = json!({"spec": {"containers": [
            {"env": [
                {"name": "A", "value": "1"},
                {"name": "P", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
                {"name": "C", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "c"}}}
            ], "envFrom": [{"secretRef": {"name": "api-keys"}}, {"configMapRef": {"name": "cfg"}}]},
            {"env": [{"name": "P2", "valueFrom": {"secretKeyRef": {"name": "db", "key": "user"}}}]}
        ]}});
        assert_eq!(env_secrets(&pod), ["api-keys", "db"]);
    }
}
