//! The lab's authorizer: what each of its identities may do, asked the way
//! kube-apiserver's RBAC is asked (a verb on a group's resource, its
//! subresource, in a namespace, by name). The server's own port-forward and
//! write paths ask it, and so do `SubjectAccessReview`s, so an answer the
//! lab gives a review is what it would do with the request.
use tpbpf_lab::identity;

use crate::auth::User;

/// One request's attributes, as `resourceAttributes` of a
/// `SubjectAccessReview` names them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
}

impl Attributes {
    pub fn new(verb: &str, group: &str, resource: &str) -> Self {
        Self {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            ..Default::default()
        }
    }

    pub fn sub(mut self, subresource: &str) -> Self {
        self.subresource = subresource.into();
        self
    }

    pub fn ns(mut self, namespace: &str) -> Self {
        self.namespace = namespace.into();
        self
    }

    pub fn named(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }

    /// `resource/subresource`, as RBAC rules name it.
    fn full_resource(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }

    /// The API server's words for a refusal.
    pub fn forbidden(&self, user: &str) -> String {
        let mut s = format!(
            "User \"{user}\" cannot {} resource \"{}\" in API group \"{}\"",
            self.verb,
            self.full_resource(),
            self.group
        );
        if !self.namespace.is_empty() {
            s.push_str(&format!(" in the namespace \"{}\"", self.namespace));
        }
        s
    }
}

const READ: &[&str] = &["get", "list", "watch"];

/// What `tpbpf up`, `run` and finding an intercept's pod read (the
/// developer role's reads; no secrets, no configmaps).
fn bridge_reads(a: &Attributes) -> bool {
    READ.contains(&a.verb.as_str())
        && a.subresource.is_empty()
        && matches!(
            (a.group.as_str(), a.resource.as_str()),
            (
                "",
                "pods" | "services" | "namespaces" | "nodes" | "endpoints"
            ) | (
                "apps",
                "deployments" | "statefulsets" | "replicasets" | "daemonsets"
            ) | ("discovery.k8s.io", "endpointslices")
                | ("networking.k8s.io", "servicecidrs")
        )
}

/// The agent's service account.
pub fn agent_service_account() -> String {
    format!(
        "system:serviceaccount:{}:{}",
        tpbpf_agent_api::NAMESPACE,
        tpbpf_agent_api::DAEMONSET
    )
}

/// Whether any rule binds `user` (the others may discover, no more).
pub fn bound(user: &User) -> bool {
    user.in_group(identity::ADMIN_GROUP)
        || [identity::DEVELOPER_USER, identity::FORWARDER_USER].contains(&user.name.as_str())
        || user.name == agent_service_account()
}

/// Whether `user` may do `a`. `restricted`: the namespaces where the
/// lab's developers may reach into pods.
pub fn allowed(user: &User, restricted: &[String], a: &Attributes) -> bool {
    if user.in_group(identity::ADMIN_GROUP) {
        return true;
    }
    let in_restricted = restricted.contains(&a.namespace);
    let core_pod = a.group.is_empty() && a.resource == "pods";
    match user.name.as_str() {
        // Reads all but secrets; in the restricted namespaces it
        // port-forwards, execs into and patches pods: what an intercept
        // and reading a pod's environment ask.
        identity::DEVELOPER_USER => {
            (READ.contains(&a.verb.as_str())
                && a.subresource.is_empty()
                && !(a.group.is_empty() && a.resource == "secrets"))
                || (core_pod
                    && in_restricted
                    && matches!(
                        (a.verb.as_str(), a.subresource.as_str()),
                        ("create" | "get", "portforward" | "exec") | ("patch" | "update", "")
                    ))
        }
        // Only what a bridge reads, and port-forward into pods of the
        // restricted namespaces: no exec, no patch, no secrets.
        identity::FORWARDER_USER => {
            bridge_reads(a)
                || (core_pod
                    && in_restricted
                    && a.subresource == "portforward"
                    && matches!(a.verb.as_str(), "create" | "get"))
        }
        // The agent's own narrow rights: reviews, its pods, and the
        // cluster's client CA (as an aggregated API server reads it).
        name if name == agent_service_account() => {
            (a.verb == "create"
                && a.subresource.is_empty()
                && matches!(
                    (a.group.as_str(), a.resource.as_str()),
                    ("authentication.k8s.io", "tokenreviews")
                        | ("authorization.k8s.io", "subjectaccessreviews")
                ))
                || (core_pod && a.subresource.is_empty() && READ.contains(&a.verb.as_str()))
                || (a.group == "apps"
                    && a.resource == "replicasets"
                    && a.subresource.is_empty()
                    && a.verb == "get")
                || (a.group.is_empty()
                    && a.resource == "configmaps"
                    && a.verb == "get"
                    && a.namespace == "kube-system"
                    && a.name == "extension-apiserver-authentication")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, groups: &[&str]) -> User {
        User {
            name: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    fn restricted() -> Vec<String> {
        vec!["default".into()]
    }

    #[test]
    fn the_forwarder_may_port_forward_but_not_patch_exec_or_read_secrets() {
        let f = user(identity::FORWARDER_USER, &[]);
        let r = restricted();
        let pod = |verb: &str, sub: &str| Attributes::new(verb, "", "pods").sub(sub).ns("default");
        assert!(allowed(&f, &r, &pod("create", "portforward")));
        assert!(allowed(&f, &r, &pod("get", "")));
        assert!(!allowed(&f, &r, &pod("patch", "")));
        assert!(!allowed(&f, &r, &pod("create", "exec")));
        assert!(!allowed(
            &f,
            &r,
            &Attributes::new("get", "", "secrets").ns("default")
        ));
        // Not outside the restricted namespaces.
        assert!(!allowed(
            &f,
            &r,
            &Attributes::new("create", "", "pods")
                .sub("portforward")
                .ns("cache")
        ));
    }

    #[test]
    fn the_developer_may_patch_and_exec_in_its_namespaces_only() {
        let d = user(identity::DEVELOPER_USER, &[]);
        let r = restricted();
        assert!(allowed(
            &d,
            &r,
            &Attributes::new("patch", "", "pods").ns("default")
        ));
        assert!(allowed(
            &d,
            &r,
            &Attributes::new("create", "", "pods")
                .sub("exec")
                .ns("default")
        ));
        assert!(!allowed(
            &d,
            &r,
            &Attributes::new("patch", "", "pods").ns("cache")
        ));
        assert!(!allowed(
            &d,
            &r,
            &Attributes::new("get", "", "secrets").ns("default")
        ));
        assert!(!allowed(
            &d,
            &r,
            &Attributes::new("create", "apps", "deployments").ns("default")
        ));
    }

    #[test]
    fn the_agent_may_review_and_read_the_client_ca_and_nothing_else() {
        let a = user(&agent_service_account(), &["system:serviceaccounts"]);
        let r = restricted();
        assert!(allowed(
            &a,
            &r,
            &Attributes::new("create", "authentication.k8s.io", "tokenreviews")
        ));
        assert!(allowed(
            &a,
            &r,
            &Attributes::new("create", "authorization.k8s.io", "subjectaccessreviews")
        ));
        let ca = Attributes::new("get", "", "configmaps").ns("kube-system");
        assert!(allowed(
            &a,
            &r,
            &ca.clone().named("extension-apiserver-authentication")
        ));
        assert!(!allowed(&a, &r, &ca.named("other")));
        assert!(!allowed(
            &a,
            &r,
            &Attributes::new("get", "", "secrets").ns("default")
        ));
        assert!(!allowed(
            &a,
            &r,
            &Attributes::new("create", "", "pods")
                .sub("exec")
                .ns("default")
        ));
    }

    #[test]
    fn masters_may_do_anything_and_strangers_nothing() {
        let r = restricted();
        let any = Attributes::new("delete", "apps", "deployments").ns("x");
        assert!(allowed(
            &user("someone", &[identity::ADMIN_GROUP]),
            &r,
            &any
        ));
        assert!(!allowed(&user("someone", &[]), &r, &any));
        assert!(!allowed(
            &user("someone", &[]),
            &r,
            &Attributes::new("get", "", "pods").ns("default")
        ));
    }
}
