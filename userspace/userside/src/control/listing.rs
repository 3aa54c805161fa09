//! What `tpbpf list` shows, and a pod's environment as JSON.
use super::*;

/// One intercept as `tpbpf list` shows it.
#[derive(Clone, Debug)]
pub(super) struct Listed {
    pub(super) name: String,
    pub(super) kind: &'static str,
    pub(super) workload: String,
    pub(super) namespace: String,
    pub(super) remote: u16,
    pub(super) local: u16,
    pub(super) mode: String,
    /// The pods it holds now.
    pub(super) pods: Vec<String>,
    /// Pod → what is wrong with its intercept.
    pub(super) problems: Vec<(String, String)>,
}

impl Listed {
    pub(super) fn json(&self) -> Value {
        let mut pods = self.pods.clone();
        pods.sort();
        // The first pod's problem, by name: the same one each time.
        let problem = self
            .problems
            .iter()
            .min_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, m)| m.clone());
        json!({"name": self.name, "remote": self.remote, "local": self.local, "mode": self.mode,
               "pods": pods, "problem": problem})
    }
}

/// The answer to `tpbpf list` for `namespace`: its workloads (kind, name,
/// replicas), each with the intercepts of it, then the workloads the list
/// does not show (replica sets, bare pods) that are intercepted, with the
/// pods held as their replicas.
pub(super) fn listing(
    namespace: &str,
    workloads: Vec<(String, String, i32)>,
    intercepts: Vec<Listed>,
) -> Value {
    let here: Vec<&Listed> = intercepts
        .iter()
        .filter(|i| i.namespace == namespace)
        .collect();
    let of = |kind: &str, name: &str| -> Vec<Value> {
        here.iter()
            .filter(|i| i.kind == kind && i.workload == name)
            .map(|i| i.json())
            .collect()
    };
    let mut out: Vec<Value> = workloads
        .into_iter()
        .map(|(kind, name, replicas)| {
            let intercepts = of(&kind, &name);
            json!({"kind": kind, "name": name, "replicas": replicas, "intercepts": intercepts})
        })
        .collect();
    for i in &here {
        if !out
            .iter()
            .any(|w| w["kind"] == i.kind && w["name"] == i.workload.as_str())
        {
            out.push(
                json!({"kind": i.kind, "name": i.workload, "replicas": i.pods.len(),
                            "intercepts": of(i.kind, &i.workload)}),
            );
        }
    }
    json!({"namespace": namespace, "workloads": out})
}

/// A process environment as the agent gives it (`KEY=VALUE` entries
/// separated by NUL bytes), as a JSON object.
/// Why the agent withheld the pod's environment (its answer is then one
/// `#` note instead of `KEY=VALUE` entries).
pub(super) fn withheld(info: &str) -> Option<String> {
    info.strip_prefix('#').map(str::to_string)
}

pub(super) fn environ(info: &str) -> serde_json::Map<String, Value> {
    info.split('\0')
        .filter_map(|e| e.split_once('='))
        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
        .collect()
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn the_pod_s_environment_becomes_an_object() {
        assert_eq!(
            Value::Object(environ("A=1\0PATH=/bin:/usr/bin\0EQ=a=b\0junk\0")),
            json!({"A": "1", "PATH": "/bin:/usr/bin", "EQ": "a=b"})
        );
        assert!(environ("").is_empty());
        // A withheld environment is a note, not a variable.
        let note = "#the environment of a/b is withheld: u may neither exec";
        assert!(environ(note).is_empty());
        assert_eq!(withheld(note).unwrap(), &note[1..]);
        assert!(withheld("A=1").is_none());
    }

    // The listing.

    fn listed(name: &str, kind: &'static str, workload: &str, pods: &[&str]) -> Listed {
        Listed {
            name: name.into(),
            kind,
            workload: workload.into(),
            namespace: "default".into(),
            remote: 80,
            local: 8080,
            mode: "Steal".into(),
            pods: pods.iter().map(|p| p.to_string()).collect(),
            problems: Vec::new(),
        }
    }

    #[test]
    fn the_listing_puts_each_intercept_under_its_workload_in_its_namespace() {
        let workloads = vec![
            ("deployment".to_string(), "web".to_string(), 2),
            ("statefulset".to_string(), "db".to_string(), 1),
        ];
        let mut web = listed("dev", "deployment", "web", &["web-2", "web-1"]);
        web.problems = vec![
            ("web-2".into(), "lost on node2: pod gone".into()),
            ("web-1".into(), "not in place yet: no agent".into()),
        ];
        let elsewhere = Listed {
            namespace: "shop".into(),
            ..listed("other", "deployment", "web", &["web-x"])
        };
        let v = listing(
            "default",
            workloads,
            vec![
                web,
                listed("rs", "replicaset", "web-7d4b9c", &["web-7d4b9c-a1"]),
                listed("rs2", "replicaset", "web-7d4b9c", &["web-7d4b9c-a1"]),
                elsewhere,
            ],
        );
        assert_eq!(
            v,
            json!({"namespace": "default", "workloads": [
                {"kind": "deployment", "name": "web", "replicas": 2, "intercepts": [
                    {"name": "dev", "remote": 80, "local": 8080, "mode": "Steal",
                     "pods": ["web-1", "web-2"], "problem": "not in place yet: no agent"}]},
                {"kind": "statefulset", "name": "db", "replicas": 1, "intercepts": []},
                // Not in the cluster's list: shown once, with both intercepts.
                {"kind": "replicaset", "name": "web-7d4b9c", "replicas": 1, "intercepts": [
                    {"name": "rs", "remote": 80, "local": 8080, "mode": "Steal",
                     "pods": ["web-7d4b9c-a1"], "problem": null},
                    {"name": "rs2", "remote": 80, "local": 8080, "mode": "Steal",
                     "pods": ["web-7d4b9c-a1"], "problem": null}]},
            ]})
        );
    }

    #[test]
    fn an_empty_namespace_lists_nothing() {
        assert_eq!(
            listing(
                "empty",
                Vec::new(),
                vec![listed("dev", "deployment", "web", &[])]
            ),
            json!({"namespace": "empty", "workloads": []})
        );
    }
}
