//! The checks fed hand-made graphs: one that keeps every rule, one change per rule.
use serde_json::json;

use super::*;

#[derive(Clone, Copy)]
enum Kind {
    Normal,
    Build,
    Dev,
}
use Kind::*;

/// A workspace as `(name, member, dependencies)`.
type Spec = Vec<(&'static str, bool, Vec<(&'static str, Kind)>)>;

/// A workspace laid out the way the rules want it.
fn layered() -> Spec {
    vec![
        ("tpbpf-sys", true, vec![("libc", Normal)]),
        ("tpbpf-bridge-api", true, vec![("serde", Normal)]),
        ("tpbpf-agent-api", true, vec![("serde", Normal)]),
        ("tpbpf-proto", true, vec![("proptest", Dev)]),
        (
            "tpbpf-loader",
            true,
            vec![("aya", Normal), ("tpbpf-sys", Normal), ("tpbpf-lab", Dev)],
        ),
        (
            "tpbpfd",
            true,
            vec![
                ("tpbpf-loader", Normal),
                ("tpbpf-sys", Normal),
                ("tpbpf-bridge-api", Normal),
                ("tokio", Normal),
                // Tests may use anything.
                ("tpbpf-lab", Dev),
                ("hyper", Dev),
            ],
        ),
        (
            "tpbpf-mux",
            true,
            vec![("tpbpf-proto", Normal), ("tokio", Normal)],
        ),
        ("tpbpf-kube", true, vec![("kube", Normal)]),
        (
            "tpbpf-userside",
            true,
            vec![
                ("tpbpf-mux", Normal),
                ("tpbpf-kube", Normal),
                ("tpbpf-bridge-api", Normal),
                ("tpbpf-sys", Normal),
            ],
        ),
        (
            "tpbpf-agent",
            true,
            vec![
                ("tpbpf-mux", Normal),
                ("tpbpf-agent-api", Normal),
                ("kube", Normal),
            ],
        ),
        (
            "tpbpf-lab-api",
            true,
            vec![("hyper", Normal), ("serde_json", Normal)],
        ),
        ("tpbpf-lab", true, vec![("tpbpf-lab-api", Normal)]),
        (
            "tpbpf",
            true,
            vec![("tpbpf-userside", Normal), ("tpbpf-lab", Normal)],
        ),
        (
            "tpbpf-vm-tests",
            true,
            vec![("tpbpf-lab", Normal), ("tpbpfd", Normal)],
        ),
        ("xtask", true, vec![("tpbpf-lab-api", Normal)]),
        ("kube", false, vec![("kube-client", Normal)]),
        (
            "kube-client",
            false,
            vec![("hyper", Normal), ("rustls", Normal)],
        ),
        ("hyper", false, vec![("tokio", Normal)]),
        ("rustls", false, vec![]),
        ("tokio", false, vec![("libc", Normal)]),
        ("aya", false, vec![("libc", Normal)]),
        ("libc", false, vec![]),
        ("serde", false, vec![("serde_derive", Normal)]),
        ("serde_derive", false, vec![]),
        ("serde_json", false, vec![("serde", Normal)]),
        ("proptest", false, vec![]),
    ]
}

fn with(mut spec: Spec, krate: &str, dep: &'static str, kind: Kind) -> Spec {
    let entry = spec
        .iter_mut()
        .find(|(name, ..)| *name == krate)
        .expect("a crate of the spec");
    entry.2.push((dep, kind));
    spec
}

fn without(spec: Spec, gone: &[&str]) -> Spec {
    spec.into_iter()
        .filter(|(name, ..)| !gone.contains(name))
        .map(|(name, member, deps)| {
            let deps = deps
                .into_iter()
                .filter(|(d, _)| !gone.contains(d))
                .collect();
            (name, member, deps)
        })
        .collect()
}

fn id(name: &str, member: bool) -> String {
    if member {
        format!("path+file:///w/{name}#{name}@0.1.0")
    } else {
        format!("registry+https://github.com/rust-lang/crates.io-index#{name}@1.0.0")
    }
}

/// `spec` as `cargo metadata --format-version 1` prints it (the fields
/// the checker reads).
fn metadata(spec: &Spec) -> Value {
    let member = |n: &str| spec.iter().any(|(name, m, _)| *name == n && *m);
    let packages: Vec<Value> = spec
        .iter()
        .map(|(name, m, _)| json!({"name": name, "version": "0.1.0", "id": id(name, *m)}))
        .collect();
    let nodes: Vec<Value> = spec
        .iter()
        .map(|(name, m, deps)| {
            let deps: Vec<Value> = deps
                .iter()
                .map(|(dep, kind)| {
                    let kind = match kind {
                        Normal => Value::Null,
                        Build => json!("build"),
                        Dev => json!("dev"),
                    };
                    json!({
                        "name": dep.replace('-', "_"),
                        "pkg": id(dep, member(dep)),
                        "dep_kinds": [{"kind": kind, "target": null}],
                    })
                })
                .collect();
            json!({"id": id(name, *m), "deps": deps, "features": []})
        })
        .collect();
    let members: Vec<String> = spec
        .iter()
        .filter(|(_, m, _)| *m)
        .map(|(name, ..)| id(name, true))
        .collect();
    json!({
        "packages": packages,
        "workspace_members": members,
        "resolve": {"nodes": nodes, "root": null},
        "version": 1,
    })
}

fn report(spec: &Spec) -> Report {
    check(&Graph::from_metadata(&metadata(spec)).expect("a graph"))
}

fn violation(rule: &'static str, path: &[&str]) -> Violation {
    Violation {
        rule,
        krate: path[0].to_string(),
        path: path.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn a_layered_workspace_breaks_no_rule_and_skips_none() {
    assert_eq!(report(&layered()), Report::default());
}

#[test]
fn the_root_service_and_the_loader_reaching_http_or_tls_are_named_with_the_path() {
    // tpbpf-sys, under both, takes rustls; the loader's build script a
    // crate that takes hyper.
    let mut spec = with(layered(), "tpbpf-sys", "rustls", Normal);
    spec.push(("fetcher", false, vec![("hyper", Normal)]));
    let spec = with(spec, "tpbpf-loader", "fetcher", Build);
    assert_eq!(
        report(&spec).violations,
        vec![
            violation(RULE_ROOT, &["tpbpf-loader", "fetcher", "hyper"]),
            violation(RULE_ROOT, &["tpbpf-loader", "tpbpf-sys", "rustls"]),
            violation(RULE_ROOT, &["tpbpfd", "tpbpf-loader", "fetcher", "hyper"]),
            violation(RULE_ROOT, &["tpbpfd", "tpbpf-sys", "rustls"]),
        ]
    );
}

#[test]
fn the_root_service_on_the_user_side_is_named_at_the_first_forbidden_crate() {
    // Through tpbpf-userside: tpbpf-kube and tpbpf-mux, not the hyper
    // and rustls behind them.
    let spec = with(layered(), "tpbpfd", "tpbpf-userside", Normal);
    assert_eq!(
        report(&spec).violations,
        vec![
            violation(RULE_ROOT, &["tpbpfd", "tpbpf-userside", "tpbpf-kube"]),
            violation(RULE_ROOT, &["tpbpfd", "tpbpf-userside", "tpbpf-mux"]),
        ]
    );
}

#[test]
fn the_root_service_on_the_lab_breaks_both_rules_about_it() {
    let spec = with(layered(), "tpbpfd", "tpbpf-lab", Normal);
    assert_eq!(
        report(&spec).violations,
        vec![
            violation(RULE_ROOT, &["tpbpfd", "tpbpf-lab"]),
            violation(RULE_LAB, &["tpbpfd", "tpbpf-lab"]),
        ]
    );
}

#[test]
fn aya_under_the_cluster_crate_is_named_for_it_and_for_the_user_side() {
    let spec = with(layered(), "tpbpf-kube", "tpbpf-loader", Normal);
    assert_eq!(
        report(&spec).violations,
        vec![
            violation(RULE_NO_AYA, &["tpbpf-kube", "tpbpf-loader", "aya"]),
            violation(
                RULE_NO_AYA,
                &["tpbpf-userside", "tpbpf-kube", "tpbpf-loader", "aya"]
            ),
        ]
    );
}

#[test]
fn aya_under_the_protocol_is_named_for_everything_above_it() {
    let spec = with(layered(), "tpbpf-proto", "aya", Normal);
    assert_eq!(
        report(&spec).violations,
        vec![
            violation(RULE_NO_AYA, &["tpbpf-mux", "tpbpf-proto", "aya"]),
            violation(RULE_NO_AYA, &["tpbpf-proto", "aya"]),
            violation(
                RULE_NO_AYA,
                &["tpbpf-userside", "tpbpf-mux", "tpbpf-proto", "aya"]
            ),
            violation(RULE_CONTRACT, &["tpbpf-proto", "aya"]),
        ]
    );
}

#[test]
fn a_contract_crate_depending_on_more_than_serde_is_named_with_the_dependency() {
    let mut spec = with(layered(), "tpbpf-proto", "thiserror", Normal);
    spec.push(("thiserror", false, vec![]));
    spec.push(("cc", false, vec![]));
    // Any new `*-api` member is a contract too, build dependencies count.
    spec.push(("tpbpf-peer-api", true, vec![("cc", Build)]));
    let spec = with(spec, "tpbpf-bridge-api", "serde_json", Normal);
    assert_eq!(
        report(&spec).violations,
        vec![
            violation(RULE_CONTRACT, &["tpbpf-bridge-api", "serde_json"]),
            violation(RULE_CONTRACT, &["tpbpf-peer-api", "cc"]),
            violation(RULE_CONTRACT, &["tpbpf-proto", "thiserror"]),
        ]
    );
}

#[test]
fn a_product_crate_on_the_lab_is_named_and_the_clis_lab_command_is_not() {
    let spec = with(layered(), "tpbpf-userside", "tpbpf-lab-api", Normal);
    assert_eq!(
        report(&spec).violations,
        vec![violation(RULE_LAB, &["tpbpf-userside", "tpbpf-lab-api"])]
    );
}

#[test]
fn the_agent_on_the_user_side_is_named() {
    let spec = with(layered(), "tpbpf-agent", "tpbpf-userside", Normal);
    assert_eq!(
        report(&spec).violations,
        vec![violation(RULE_AGENT, &["tpbpf-agent", "tpbpf-userside"])]
    );
    // Through the tunnel crate, were it to take the cluster crate.
    let spec = with(layered(), "tpbpf-mux", "tpbpf-kube", Normal);
    assert_eq!(
        report(&spec).violations,
        vec![violation(
            RULE_AGENT,
            &["tpbpf-agent", "tpbpf-mux", "tpbpf-kube"]
        )]
    );
}

#[test]
fn a_rule_whose_crate_is_not_there_yet_is_skipped_with_a_note() {
    let spec = without(layered(), &["tpbpfd", "tpbpf-userside", "tpbpf-bridge-api"]);
    let spec = with(spec, "tpbpf-loader", "kube", Normal);
    let r = report(&spec);
    assert_eq!(
        r.skipped,
        vec![
            "rule 1: no crate tpbpfd in the workspace yet, skipped for it",
            "rule 2: no crate tpbpf-userside in the workspace yet, skipped for it",
            "rule 3: no crate tpbpf-bridge-api in the workspace yet, skipped for it",
        ]
    );
    // The rest of rule 1 still holds.
    assert_eq!(
        r.violations,
        vec![violation(RULE_ROOT, &["tpbpf-loader", "kube"])]
    );
    let no_lab = without(layered(), LAB_CRATES);
    assert_eq!(
        report(&no_lab).skipped,
        vec!["rule 4: no crate tpbpf-lab or tpbpf-lab-api in the workspace yet, skipped for it"]
    );
}

#[test]
fn cargo_metadatas_own_format_parses_dev_only_edges_away() {
    // As cargo prints it: a renamed dependency, one that is both dev and
    // normal, one only dev.
    let text = r#"{
      "packages": [
        {"name": "tpbpfd", "version": "0.1.0", "id": "path+file:///w/userspace/bridge#tpbpfd@0.1.0", "dependencies": []},
        {"name": "tpbpf-kube", "version": "0.1.0", "id": "path+file:///w/userspace/kube#0.1.0", "dependencies": []},
        {"name": "hyper", "version": "1.7.0", "id": "registry+https://github.com/rust-lang/crates.io-index#hyper@1.7.0", "dependencies": []},
        {"name": "libc", "version": "0.2.170", "id": "registry+https://github.com/rust-lang/crates.io-index#libc@0.2.170", "dependencies": []}
      ],
      "workspace_members": ["path+file:///w/userspace/bridge#tpbpfd@0.1.0", "path+file:///w/userspace/kube#0.1.0"],
      "resolve": {"nodes": [
        {"id": "path+file:///w/userspace/bridge#tpbpfd@0.1.0", "dependencies": [], "deps": [
          {"name": "k", "pkg": "path+file:///w/userspace/kube#0.1.0", "dep_kinds": [{"kind": "dev", "target": null}]},
          {"name": "libc", "pkg": "registry+https://github.com/rust-lang/crates.io-index#libc@0.2.170", "dep_kinds": [{"kind": "dev", "target": null}, {"kind": null, "target": "cfg(unix)"}]}
        ], "features": []},
        {"id": "path+file:///w/userspace/kube#0.1.0", "dependencies": [], "deps": [
          {"name": "hyper", "pkg": "registry+https://github.com/rust-lang/crates.io-index#hyper@1.7.0", "dep_kinds": [{"kind": null, "target": null}]}
        ], "features": []},
        {"id": "registry+https://github.com/rust-lang/crates.io-index#hyper@1.7.0", "dependencies": [], "deps": [], "features": []},
        {"id": "registry+https://github.com/rust-lang/crates.io-index#libc@0.2.170", "dependencies": [], "deps": [], "features": []}
      ], "root": null},
      "version": 1
    }"#;
    let graph = Graph::from_metadata(&serde_json::from_str(text).unwrap()).unwrap();
    let tpbpfd = graph.member("tpbpfd").unwrap();
    assert_eq!(graph.deps(tpbpfd).len(), 1);
    assert_eq!(graph.name(&graph.deps(tpbpfd)[0]), "libc");
    assert!(graph.member("hyper").is_none());
    assert!(check(&graph).violations.is_empty());
}

#[test]
fn metadata_without_a_resolve_graph_is_an_error_that_says_so() {
    let text = r#"{"packages": [], "workspace_members": [], "resolve": null}"#;
    let err = Graph::from_metadata(&serde_json::from_str(text).unwrap()).unwrap_err();
    assert!(err.to_string().contains("--no-deps"), "{err}");
}

#[test]
fn a_violation_reads_as_the_crate_and_its_path() {
    assert_eq!(
        violation(RULE_ROOT, &["tpbpfd", "tpbpf-kube", "kube", "kube-client", "hyper"])
            .to_string(),
        format!("{RULE_ROOT}: tpbpfd depends on hyper: tpbpfd -> tpbpf-kube -> kube -> kube-client -> hyper")
    );
    assert_eq!(
        violation(RULE_CONTRACT, &["tpbpf-proto", "thiserror"]).to_string(),
        format!("{RULE_CONTRACT}: tpbpf-proto depends on thiserror: tpbpf-proto -> thiserror")
    );
}

#[test]
fn a_file_of_800_lines_passes_and_one_of_801_is_named_longest_first() {
    let at = "x\n".repeat(MAX_LINES);
    let over = "x\n".repeat(MAX_LINES + 1);
    let far = "x\n".repeat(2 * MAX_LINES);
    let files = [
        (Path::new("a.rs"), at.as_str()),
        (Path::new("b.rs"), over.as_str()),
        (Path::new("c.rs"), far.as_str()),
    ];
    assert_eq!(
        too_long(files, MAX_LINES),
        vec![
            (Path::new("c.rs"), 2 * MAX_LINES),
            (Path::new("b.rs"), MAX_LINES + 1)
        ]
    );
}

#[test]
fn product_sources_leave_out_tests_benches_and_kernel_code() {
    let root = std::env::temp_dir().join(format!("tpbpf-layering-{}", std::process::id()));
    let files = [
        "agent/src/main.rs",
        "agent/src/tunnel/session.rs",
        "userspace/mux/src/conn.rs",
        "userspace/mux/src/tests/scripted.rs",
        "userspace/mux/tests/soak.rs",
        "userspace/mux/benches/mux.rs",
        "userspace/mux-bench/src/main.rs",
        "userspace/lab/src/lib.rs",
        "userspace/loader/src/bpf/maps.rs",
        "userspace/loader/src/README.md",
        "xtask/src/main.rs",
    ];
    for f in files {
        let path = root.join(f);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "").unwrap();
    }
    let found: Vec<String> = product_sources(&root)
        .unwrap()
        .iter()
        .map(|p| p.strip_prefix(&root).unwrap().display().to_string())
        .collect();
    std::fs::remove_dir_all(&root).unwrap();
    assert_eq!(
        found,
        vec![
            "agent/src/main.rs",
            "agent/src/tunnel/session.rs",
            "userspace/lab/src/lib.rs",
            "userspace/mux/src/conn.rs",
        ]
    );
}
