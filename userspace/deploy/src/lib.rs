//! What `tpbpf install` applies to a cluster, in one place: the agent's
//! namespace and service account, the agent DaemonSet (its own pod network,
//! hostPID, the least capabilities that work), and the `tpbpf-developer`
//! RBAC with exactly the verbs `up`, `run` and `intercept` need. Built from
//! k8s-openapi types, so what is printed (`--dry-run -o yaml`) is what is
//! applied.
use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy},
        core::v1::{
            Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, Namespace,
            ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
            ResourceRequirements, SeccompProfile, SecurityContext, ServiceAccount, TCPSocketAction,
            Toleration,
        },
        rbac::v1::{
            ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
        },
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};
use serde_json::Value;

/// tpbpf's namespace in the cluster.
pub const NAMESPACE: &str = tpbpf_agent_api::NAMESPACE;
/// The agent's DaemonSet, service account and `app` label.
pub const AGENT: &str = tpbpf_agent_api::DAEMONSET;
/// The agent's HTTP port (loopback of its pod: `/credentials` through a
/// port-forward only).
pub const AGENT_PORT: u16 = tpbpf_agent_api::HTTP_PORT;
/// The agent's tunnel port, published as a hostPort for `--transport direct`.
pub const TUNNEL_PORT: u16 = tpbpf_agent_api::TUNNEL_PORT;
/// The ClusterRole a platform team binds developers to (cluster-wide, or
/// per namespace with a RoleBinding).
pub const DEVELOPER_ROLE: &str = "tpbpf-developer";
/// The Role in tpbpf's namespace that lets developers open tunnels.
pub const TUNNEL_ROLE: &str = "tpbpf-tunnel";

/// What an install is made of.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The agent image.
    pub image: String,
    /// The cluster's service and pod ranges: the only ranges tunnels reach.
    pub cluster_cidrs: Vec<String>,
    /// Further ranges a cluster admin lets developers reach.
    pub allow_cidrs: Vec<String>,
    /// Seconds a session whose developer is away keeps its intercepts.
    pub resume_window_s: u64,
    /// What an intercept asks of a developer (the agent's
    /// `--intercept-rights`: `patch-pod`, `patch-workload`, `port-forward`).
    pub intercept_rights: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            image: format!("ghcr.io/tpbpf/tpbpf-agent:{}", env!("CARGO_PKG_VERSION")),
            cluster_cidrs: Vec::new(),
            allow_cidrs: Vec::new(),
            resume_window_s: 30,
            intercept_rights: "patch-pod".into(),
        }
    }
}

fn labels() -> BTreeMap<String, String> {
    [
        ("app", AGENT),
        ("app.kubernetes.io/name", AGENT),
        ("app.kubernetes.io/part-of", "tpbpf"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: namespace.map(Into::into),
        labels: Some([("app.kubernetes.io/part-of".to_string(), "tpbpf".to_string())].into()),
        ..Default::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The agent DaemonSet.
pub fn daemon_set(s: &Settings) -> DaemonSet {
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--listen".into(),
        format!("127.0.0.1:{AGENT_PORT}"),
        "--tunnel-listen".into(),
        format!("0.0.0.0:{TUNNEL_PORT}"),
        "--resume-window-s".into(),
        s.resume_window_s.to_string(),
        "--intercept-rights".into(),
        s.intercept_rights.clone(),
    ];
    for c in &s.cluster_cidrs {
        args.extend(["--cluster-cidr".into(), c.clone()]);
    }
    for c in &s.allow_cidrs {
        args.extend(["--allow-cidr".into(), c.clone()]);
    }
    let container = Container {
        name: "agent".into(),
        image: Some(s.image.clone()),
        args: Some(args),
        env: Some(vec![
            field_env("NODE_NAME", "spec.nodeName"),
            field_env("NODE_IP", "status.hostIP"),
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some("http".into()),
                container_port: i32::from(AGENT_PORT),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some("tunnel".into()),
                container_port: i32::from(TUNNEL_PORT),
                host_port: Some(i32::from(TUNNEL_PORT)),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        // The HTTP port listens on the pod's loopback, out of the kubelet's
        // reach; the tunnel port is what clients use.
        readiness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(i32::from(TUNNEL_PORT)),
                ..Default::default()
            }),
            period_seconds: Some(10),
            ..Default::default()
        }),
        // The same probe restarts an agent whose tunnel listener is gone
        // (not one that is merely slow: a minute of failures).
        liveness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(i32::from(TUNNEL_PORT)),
                ..Default::default()
            }),
            initial_delay_seconds: Some(10),
            period_seconds: Some(20),
            failure_threshold: Some(3),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(
                [
                    ("cpu".to_string(), Quantity("50m".into())),
                    ("memory".to_string(), Quantity("64Mi".into())),
                ]
                .into(),
            ),
            // One core at most: an agent on every node must not starve the
            // node's workloads (the chart's `resources` value raises it).
            limits: Some(
                [
                    ("cpu".to_string(), Quantity("1".into())),
                    ("memory".to_string(), Quantity("512Mi".into())),
                ]
                .into(),
            ),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            // Root with exactly these capabilities: BPF and NET_ADMIN to
            // load and attach sk_lookup, SYS_ADMIN to enter pods' network
            // namespaces, SYS_PTRACE to read a pod process's namespace and
            // environment under /proc (hostPID).
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_user: Some(0),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: Some(
                    ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]
                        .map(String::from)
                        .to_vec(),
                ),
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    DaemonSet {
        metadata: ObjectMeta {
            labels: Some(labels()),
            ..meta(AGENT, Some(NAMESPACE))
        },
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some([("app".to_string(), AGENT.to_string())].into()),
                ..Default::default()
            },
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                ..Default::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels()),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(AGENT.into()),
                    // The agent asks the API server who a developer is and
                    // what they may do (`agent_role`: reviews, pods, their
                    // owners, the client CA; nothing else).
                    automount_service_account_token: Some(true),
                    host_pid: Some(true),
                    host_network: Some(false),
                    security_context: Some(PodSecurityContext {
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    // Linux nodes only: the agent is a Linux eBPF program,
                    // and a Windows node would keep `install` waiting.
                    node_selector: Some(
                        [("kubernetes.io/os".to_string(), "linux".to_string())].into(),
                    ),
                    // Every node, tainted ones too: intercepts may target
                    // any pod.
                    tolerations: Some(vec![Toleration {
                        operator: Some("Exists".into()),
                        ..Default::default()
                    }]),
                    containers: vec![container],
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    let v = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    PolicyRule {
        api_groups: Some(v(groups)),
        resources: Some(v(resources)),
        verbs: v(verbs),
        ..Default::default()
    }
}

/// What `tpbpf up`, `run` and `intercept` read and do, and nothing else.
/// Bound cluster-wide it lets a developer intercept any pod; bound per
/// namespace (RoleBinding), only that namespace's.
pub fn developer_role() -> ClusterRole {
    ClusterRole {
        metadata: meta(DEVELOPER_ROLE, None),
        rules: Some(vec![
            // Discovery (up, run) and workload -> pods -> node (intercept).
            rule(
                &[""],
                &["pods", "services", "namespaces", "nodes"],
                &["get", "list", "watch"],
            ),
            rule(
                &["apps"],
                &["deployments", "statefulsets", "replicasets", "daemonsets"],
                &["get", "list", "watch"],
            ),
            rule(&["discovery.k8s.io"], &["endpointslices"], &["get", "list"]),
            rule(&["networking.k8s.io"], &["servicecidrs"], &["get", "list"]),
            // The service range from the API server's answer to a dry-run
            // create with an invalid ClusterIP (nothing is created).
            rule(&[""], &["services"], &["create"]),
            // An intercept takes the right to change the pod (the
            // default `--intercept-rights patch-pod`), or with
            // `port-forward`, a port-forward into it.
            rule(&[""], &["pods"], &["patch"]),
            rule(&[""], &["pods/portforward"], &["get", "create"]),
            // Reading an intercepted pod's environment: exec (or `get` on
            // every secret it references, bound separately).
            rule(&[""], &["pods/exec"], &["create"]),
        ]),
        aggregation_rule: None,
    }
}

/// The agent's own rights: who a developer is (TokenReview) and what they
/// may do (SubjectAccessReview), the pods it checks and their owners.
pub fn agent_role() -> ClusterRole {
    ClusterRole {
        metadata: meta(AGENT, None),
        rules: Some(vec![
            rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
            rule(
                &["authorization.k8s.io"],
                &["subjectaccessreviews"],
                &["create"],
            ),
            rule(&[""], &["pods"], &["get"]),
            rule(&["apps"], &["replicasets"], &["get"]),
        ]),
        aggregation_rule: None,
    }
}

/// Binds [`agent_role`] to the agent's service account; and, in
/// kube-system, Kubernetes' own `extension-apiserver-authentication-reader`
/// (the cluster's client CA, which a client certificate is checked
/// against, as an aggregated API server reads it).
fn agent_bindings() -> (ClusterRoleBinding, RoleBinding) {
    let subject = Subject {
        kind: "ServiceAccount".into(),
        name: AGENT.into(),
        namespace: Some(NAMESPACE.into()),
        ..Default::default()
    };
    (
        ClusterRoleBinding {
            metadata: meta(AGENT, None),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "ClusterRole".into(),
                name: AGENT.into(),
            },
            subjects: Some(vec![subject.clone()]),
        },
        RoleBinding {
            metadata: meta(AGENT, Some("kube-system")),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: "extension-apiserver-authentication-reader".into(),
            },
            subjects: Some(vec![subject]),
        },
    )
}

/// Opening a tunnel: a port-forward into an agent pod.
pub fn tunnel_role() -> Role {
    Role {
        metadata: meta(TUNNEL_ROLE, Some(NAMESPACE)),
        rules: Some(vec![
            rule(&[""], &["pods"], &["get", "list", "watch"]),
            rule(&[""], &["pods/portforward"], &["get", "create"]),
        ]),
    }
}

/// Every object of an install, in the order they are applied.
pub fn objects(s: &Settings) -> Vec<Value> {
    let ns = Namespace {
        metadata: ObjectMeta {
            labels: Some(
                [
                    ("app.kubernetes.io/part-of".to_string(), "tpbpf".to_string()),
                    // The agent needs hostPID and capabilities.
                    (
                        "pod-security.kubernetes.io/enforce".to_string(),
                        "privileged".to_string(),
                    ),
                ]
                .into(),
            ),
            ..meta(NAMESPACE, None)
        },
        ..Default::default()
    };
    let sa = ServiceAccount {
        metadata: meta(AGENT, Some(NAMESPACE)),
        automount_service_account_token: Some(false),
        ..Default::default()
    };
    let to = |v: serde_json::Result<Value>| v.unwrap_or(Value::Null);
    let bindings = agent_bindings();
    vec![
        to(serde_json::to_value(ns)),
        to(serde_json::to_value(sa)),
        to(serde_json::to_value(developer_role())),
        to(serde_json::to_value(tunnel_role())),
        to(serde_json::to_value(agent_role())),
        to(serde_json::to_value(&bindings.0)),
        to(serde_json::to_value(&bindings.1)),
        to(serde_json::to_value(daemon_set(s))),
    ]
}

/// The objects as one YAML stream (`---` between documents).
pub fn to_yaml(objects: &[Value]) -> String {
    objects
        .iter()
        .map(|o| serde_saphyr::to_string(o).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The Helm chart (`deploy/helm/tpbpf`), rendered from the same objects as
/// `tpbpf install`, so the two cannot drift: values stand in where the
/// chart takes them (image, ranges, tolerations, resources, resume window).
/// Returns (path inside the chart, content).
pub fn helm_chart() -> Vec<(&'static str, String)> {
    const IMAGE: &str =
        "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}";
    let settings = Settings {
        image: IMAGE.into(),
        cluster_cidrs: vec!["__TPBPF_RANGE_cluster-cidr_clusterCidrs__".into()],
        allow_cidrs: vec!["__TPBPF_RANGE_allow-cidr_allowCidrs__".into()],
        resume_window_s: 0,
        intercept_rights: "patch-pod".into(),
    };
    let mut objs = objects(&settings);
    let ds = objs.last_mut().expect("the DaemonSet comes last");
    let pod = &mut ds["spec"]["template"]["spec"];
    pod["tolerations"] = Value::from("__TPBPF_YAML_tolerations__");
    let c = &mut pod["containers"][0];
    c["resources"] = Value::from("__TPBPF_YAML_resources__");
    if let Some(args) = c["args"].as_array_mut() {
        // Each range placeholder stands for its flags too.
        args.retain(|a| a != "--cluster-cidr" && a != "--allow-cidr");
        for a in args.iter_mut() {
            if a == "0" {
                *a = Value::from("__TPBPF_QUOTE_resumeWindowSeconds__");
            } else if a == "patch-pod" {
                *a = Value::from("__TPBPF_QUOTE_interceptRights__");
            }
        }
    }
    let mut templates = String::from(
        "# Rendered by `cargo xtask chart` from userspace/deploy (the objects\n\
         # `tpbpf install` applies); edit those, not this file.\n",
    );
    templates.push_str("{{- if not .Values.clusterCidrs }}\n{{- fail \"set clusterCidrs: the cluster's service and pod ranges\" }}\n{{- end }}\n");
    for line in to_yaml(&objs).lines() {
        templates.push_str(&helm_line(line));
        templates.push('\n');
    }
    // Serialized, not written by hand: the description's colon must be quoted.
    let chart = serde_saphyr::to_string(&serde_json::json!({
        "apiVersion": "v2",
        "name": "tpbpf",
        "description": "tpbpf's node agent: reach cluster services from a developer machine and intercept pods' traffic, with eBPF",
        "type": "application",
        "version": env!("CARGO_PKG_VERSION"),
        "appVersion": env!("CARGO_PKG_VERSION"),
    }))
    .unwrap_or_default();
    // The defaults are the install's own: the same objects, serialized.
    let d = Settings::default();
    let (repo, _) = d.image.rsplit_once(':').unwrap_or((&d.image, ""));
    let ds = serde_json::to_value(daemon_set(&d)).unwrap_or_default();
    let pod = &ds["spec"]["template"]["spec"];
    let defaults = serde_json::json!({
        "image": {"repository": repo, "tag": ""},
        "clusterCidrs": [],
        "allowCidrs": [],
        "resumeWindowSeconds": d.resume_window_s,
        "interceptRights": d.intercept_rights,
        "tolerations": pod["tolerations"],
        "resources": pod["containers"][0]["resources"],
    });
    let values = format!(
        "# tpbpf's agent. Rendered by `cargo xtask chart` from userspace/deploy.\n\
         # clusterCidrs (required): the cluster's service and pod ranges, the only\n\
         # ranges tunnels reach; allowCidrs: more ranges developers may reach;\n\
         # image.tag defaults to the chart's appVersion.\n{}",
        serde_saphyr::to_string(&defaults).unwrap_or_default()
    );
    vec![
        ("Chart.yaml", chart),
        ("values.yaml", values),
        ("templates/tpbpf.yaml", templates),
    ]
}

/// One line of the install's YAML, with its placeholders made templates.
fn helm_line(line: &str) -> String {
    let indent = line.len() - line.trim_start().len();
    let pad = " ".repeat(indent);
    let t = line.trim_start();
    if let Some(rest) = t.strip_prefix("- __TPBPF_RANGE_") {
        // A flag per value: `--flag`, `VALUE`.
        let inner = rest.trim_end_matches("__");
        let (flag, values) = inner.split_once('_').unwrap_or((inner, inner));
        return format!(
            "{pad}{{{{- range .Values.{values} }}}}\n{pad}- --{flag}\n{pad}- {{{{ . | quote }}}}\n{pad}{{{{- end }}}}"
        );
    }
    if let Some((key, v)) = t.split_once(": __TPBPF_YAML_") {
        let values = v.trim_end_matches("__");
        return format!(
            "{pad}{key}:\n{pad}  {{{{- toYaml .Values.{values} | nindent {} }}}}",
            indent + 2
        );
    }
    if let Some(rest) = t.strip_prefix("- __TPBPF_QUOTE_") {
        let values = rest.trim_end_matches("__");
        return format!("{pad}- {{{{ .Values.{values} | quote }}}}");
    }
    line.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            image: "tpbpf-agent:test".into(),
            cluster_cidrs: vec!["10.96.0.0/12".into(), "10.244.0.0/16".into()],
            allow_cidrs: vec!["192.0.2.0/24".into()],
            resume_window_s: 30,
            intercept_rights: "patch-pod".into(),
        }
    }

    #[test]
    fn every_object_has_its_kind_and_api_version() {
        let objs = objects(&settings());
        let kinds: Vec<(&str, &str)> = objs
            .iter()
            .map(|o| {
                (
                    o["apiVersion"].as_str().unwrap(),
                    o["kind"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            kinds,
            [
                ("v1", "Namespace"),
                ("v1", "ServiceAccount"),
                ("rbac.authorization.k8s.io/v1", "ClusterRole"),
                ("rbac.authorization.k8s.io/v1", "Role"),
                ("rbac.authorization.k8s.io/v1", "ClusterRole"),
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
                ("rbac.authorization.k8s.io/v1", "RoleBinding"),
                ("apps/v1", "DaemonSet"),
            ]
        );
    }

    #[test]
    fn the_agent_has_its_own_pod_network_and_the_least_capabilities() {
        let ds = serde_json::to_value(daemon_set(&settings())).unwrap();
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(pod["hostNetwork"], false);
        assert_eq!(pod["hostPID"], true);
        let c = &pod["containers"][0];
        assert_eq!(c["securityContext"]["privileged"], false);
        assert_eq!(
            c["securityContext"]["capabilities"]["drop"],
            serde_json::json!(["ALL"])
        );
        let args: Vec<&str> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(args
            .windows(2)
            .any(|w| w == ["--cluster-cidr", "10.244.0.0/16"]));
        assert!(args
            .windows(2)
            .any(|w| w == ["--allow-cidr", "192.0.2.0/24"]));
        assert!(args.windows(2).any(|w| w == ["--listen", "127.0.0.1:4390"]));
    }

    /// What the manifest linter (checkov, `cargo xtask test`) asks for and
    /// the agent can give: a liveness probe and a CPU limit.
    #[test]
    fn the_agent_has_a_liveness_probe_and_a_cpu_limit() {
        let ds = serde_json::to_value(daemon_set(&settings())).unwrap();
        let c = &ds["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            c["livenessProbe"]["tcpSocket"]["port"],
            i32::from(TUNNEL_PORT)
        );
        assert_eq!(c["resources"]["limits"]["cpu"], "1");
    }

    /// Chart.yaml and values.yaml are YAML a parser takes (the templates
    /// are Go templates, which helm renders).
    #[test]
    fn the_charts_plain_files_parse_as_yaml() {
        for (name, text) in helm_chart() {
            if name.ends_with("yaml") && !name.starts_with("templates/") {
                let v: serde_json::Value = serde_saphyr::from_str(&text)
                    .unwrap_or_else(|e| panic!("{name} is not YAML: {e}\n{text}"));
                assert!(v.is_object(), "{name}: {v}");
            }
        }
        let chart: serde_json::Value = serde_saphyr::from_str(&helm_chart()[0].1).unwrap();
        assert!(chart["description"].as_str().unwrap().contains(": reach"));
    }

    /// deploy/helm/tpbpf is what `cargo xtask chart` renders from these
    /// objects: the chart and `tpbpf install` cannot drift.
    #[test]
    fn the_helm_chart_is_rendered_from_the_install_objects() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/helm/tpbpf");
        for (path, want) in helm_chart() {
            let got = std::fs::read_to_string(dir.join(path)).unwrap_or_default();
            assert!(
                got == want,
                "deploy/helm/tpbpf/{path} differs from what the install applies: run `cargo xtask chart`"
            );
        }
        let t = &helm_chart()[2].1;
        assert!(!t.contains("__TPBPF"), "a placeholder was left:\n{t}");
        assert!(t.contains("{{- range .Values.clusterCidrs }}"), "{t}");
        assert!(t.contains("toYaml .Values.tolerations"), "{t}");
    }

    #[test]
    fn yaml_is_one_document_per_object() {
        let yaml = to_yaml(&objects(&settings()));
        assert_eq!(
            yaml.matches("\n---\n").count() + usize::from(yaml.starts_with("---")),
            7
        );
        assert!(yaml.contains("kind: DaemonSet"), "{yaml}");
    }
}
