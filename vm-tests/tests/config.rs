//! Project settings (`tpbpf.yaml`): found from a parent directory, the
//! precedence flag > environment > project file > kubeconfig extension,
//! errors that name the file, line and key, the docs' example valid against
//! the generated schema, and a file whose intercepts `up` starts and `down`
//! ends, through the lab.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;
use tpbpf_vm_tests::*;

/// `tpbpf ARGS` in `dir` with `env` set (and every `TPBPF_*` of the
/// test's own environment taken away).
fn tpbpf_in(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(tpbpf_bin());
    cmd.current_dir(dir).args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("TPBPF_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().unwrap()
}

fn ok(out: std::process::Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// The project file's name.
const FILE: &str = "tpbpf.yaml";

/// A kubeconfig with two contexts, `lab` (current) and `other`, each with
/// a `tpbpf` extension.
const KUBECONFIG: &str = "apiVersion: v1
kind: Config
clusters:
- name: lab
  cluster:
    server: https://192.0.2.1:6443
users:
- name: dev
  user:
    token: not-a-real-token
contexts:
- name: lab
  context:
    cluster: lab
    user: dev
    namespace: default
    extensions:
    - name: tpbpf
      extension:
        namespaces: [db]
        mapped-namespaces: [default, cache, db]
        never-proxy: [10.96.0.99/32]
        transport: direct
- name: other
  context:
    cluster: lab
    user: dev
    extensions:
    - name: tpbpf
      extension:
        also-proxy: [192.0.2.0/24]
current-context: lab
";

#[test]
fn settings_come_from_flags_the_environment_the_project_file_and_the_kubeconfig_in_that_order() {
    let root = TempDir::new("tpbpf-project");
    std::fs::create_dir_all(root.0.join("kube")).unwrap();
    std::fs::create_dir_all(root.0.join("src/deep/er")).unwrap();
    std::fs::write(root.0.join("kube/config"), KUBECONFIG).unwrap();
    let project = root.0.join("tpbpf.yaml");
    std::fs::write(
        &project,
        "kubeconfig: kube/config\nnamespaces: [default, cache]\ntransport: portforward\ncluster-domain: cluster.local\ndns-suffixes: [corp.internal]\n",
    )
    .unwrap();
    let deep = root.0.join("src/deep/er");

    // Found from three directories down; each value from its layer.
    let v = ok(
        tpbpf_in(&deep, &[], &["config", "show", "-o", "json"]),
        "config show",
    );
    assert_eq!(v["project"], project.display().to_string(), "{v}");
    let s = &v["settings"];
    let from = &v["sources"];
    assert_eq!(
        s["namespaces"],
        serde_json::json!(["default", "cache"]),
        "{v}"
    );
    assert_eq!(s["transport"], "portforward", "{v}");
    assert_eq!(
        s["kubeconfig"],
        root.0.join("kube/config").display().to_string(),
        "a path in the file is relative to the file: {v}"
    );
    let project_src = format!("project file {}", project.display());
    assert_eq!(
        s["dns-suffixes"],
        serde_json::json!(["corp.internal"]),
        "{v}"
    );
    for key in [
        "namespaces",
        "transport",
        "cluster-domain",
        "dns-suffixes",
        "kubeconfig",
    ] {
        assert_eq!(from[key], project_src.as_str(), "{key}: {v}");
    }
    // What the project file leaves unset, the kubeconfig's context gives.
    assert_eq!(
        s["mapped-namespaces"],
        serde_json::json!(["default", "cache", "db"]),
        "{v}"
    );
    assert_eq!(
        s["never-proxy"],
        serde_json::json!(["10.96.0.99/32"]),
        "{v}"
    );
    let kube_src = from["mapped-namespaces"].as_str().unwrap_or_default();
    assert!(
        kube_src.starts_with("kubeconfig ") && kube_src.contains("context lab"),
        "{v}"
    );
    assert!(s["also-proxy"].is_null(), "{v}");

    // The environment beats the project file; the context it names picks
    // that context's extension.
    let v = ok(
        tpbpf_in(
            &deep,
            &[
                ("TPBPF_TRANSPORT", "direct"),
                ("TPBPF_NAMESPACES", "db,cache"),
                ("TPBPF_CONTEXT", "other"),
            ],
            &["config", "show", "-o", "json"],
        ),
        "config show with TPBPF_*",
    );
    assert_eq!(v["settings"]["transport"], "direct", "{v}");
    assert_eq!(v["sources"]["transport"], "environment (TPBPF_TRANSPORT)");
    assert_eq!(
        v["settings"]["namespaces"],
        serde_json::json!(["db", "cache"])
    );
    assert_eq!(v["settings"]["context"], "other");
    assert_eq!(
        v["settings"]["also-proxy"],
        serde_json::json!(["192.0.2.0/24"]),
        "{v}"
    );
    assert!(v["settings"]["mapped-namespaces"].is_null(), "{v}");

    // A flag beats the environment: `up` with a flag and a variable that
    // disagree stops at the first value checked, the flag's.
    let out = tpbpf_in(
        &deep,
        &[("TPBPF_TRANSPORT", "direct")],
        &["up", "--transport", "pigeon"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--transport pigeon"),
        "{err}"
    );

    // --config names another file; outside any project nothing is read.
    let other = root.0.join("other.yaml");
    std::fs::write(&other, "namespaces: [kube-system]\n").unwrap();
    let v = ok(
        tpbpf_in(
            &deep,
            &[],
            &[
                "config",
                "show",
                "-o",
                "json",
                "--config",
                other.to_str().unwrap(),
            ],
        ),
        "config show --config",
    );
    assert_eq!(
        v["settings"]["namespaces"],
        serde_json::json!(["kube-system"])
    );
    let outside = TempDir::new("tpbpf-no-project");
    let v = ok(
        tpbpf_in(
            &outside.0,
            &[("KUBECONFIG", "/nonexistent"), ("HOME", "/nonexistent")],
            &["config", "show", "-o", "json"],
        ),
        "config show outside a project",
    );
    assert!(v["project"].is_null(), "{v}");
    assert_eq!(v["sources"], serde_json::json!({}), "{v}");
}

#[test]
fn a_bad_key_or_value_is_refused_with_its_file_line_and_key() {
    let root = TempDir::new("tpbpf-project-bad");
    let project = root.0.join(FILE);
    let cases: &[(&str, &str, &str)] = &[
        (
            "namespaces: [default]\nintercepts:\n- workload: web\n  port: \"80:8080\"\n  filtr: x\n",
            "line 5",
            "unknown field `filtr`",
        ),
        ("namespace: [default]\n", "line 1", "unknown field `namespace`"),
        ("transport: pigeon\n", "line 1", "pigeon"),
        ("namespaces: [default, Cache]\n", "line 1", "`Cache` is not a namespace name"),
        ("also-proxy:\n  - 10.0.0.0/8\n  - 10.0.0.0/33\n", "line 3", "10.0.0.0/33"),
        (
            "intercepts:\n- workload: web\n  port: \"80:http\"\n",
            "line 3",
            "port `80:http`",
        ),
    ];
    for (text, line, key) in cases {
        std::fs::write(&project, text).unwrap();
        for args in [&["config", "check"][..], &["up", "--instance", "never"][..]] {
            let out = tpbpf_in(&root.0, &[], args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} accepted {text:?}");
            assert!(
                err.contains(&project.display().to_string())
                    && err.contains(line)
                    && err.contains(key),
                "{args:?} on {text:?} said: {err}"
            );
        }
    }
    // The bridge named in `up` above was never started.
    assert!(!Path::new("/run/tpbpf/never").exists());
}

/// The example in docs/config.md (the yaml block after its marker).
fn docs_example() -> String {
    let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/config.md");
    let text = std::fs::read_to_string(&docs).unwrap();
    let after = text
        .split_once("<!-- example: tpbpf.yaml")
        .expect("docs/config.md has its example")
        .1;
    let block = after.split_once("```yaml\n").expect("a yaml block").1;
    block
        .split_once("```")
        .expect("the block ends")
        .0
        .to_string()
}

#[test]
fn the_docs_example_is_valid_for_the_schema_and_for_up() {
    let example = docs_example();
    let root = TempDir::new("tpbpf-docs-example");
    std::fs::write(root.0.join(FILE), &example).unwrap();
    // `up`'s own reading.
    let out = tpbpf_in(&root.0, &[], &["config", "check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The generated schema, as an editor would apply it.
    let out = tpbpf_in(&root.0, &[], &["config", "schema"]);
    let schema: Value = serde_json::from_slice(&out.stdout).unwrap();
    let validator = jsonschema::validator_for(&schema).expect("a valid JSON Schema");
    let instance: Value = serde_saphyr::from_str(&example).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&instance)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    // And the schema does refuse what `up` refuses.
    let mut bad = instance.clone();
    bad["intercepts"][0]["filtr"] = "x".into();
    assert!(!validator.is_valid(&bad), "the schema takes an unknown key");
    let mut bad = instance;
    bad["transport"] = "pigeon".into();
    assert!(
        !validator.is_valid(&bad),
        "the schema takes an unknown transport"
    );
}

#[test]
fn a_project_file_starts_its_intercepts_with_up_and_down_ends_them() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("cf") else {
        return;
    };
    let dev = lab.dev_netns();
    let root = TempDir::new("tpbpf-project-lab");
    std::fs::create_dir_all(root.0.join("kube")).unwrap();
    std::fs::create_dir_all(root.0.join("services/web")).unwrap();
    std::fs::copy(lab.kubeconfig(), root.0.join("kube/config")).unwrap();
    std::fs::write(
        root.0.join(FILE),
        "kubeconfig: kube/config
namespaces: [default]
transport: direct
intercepts:
- workload: web
  port: \"80:18080\"
- workload: redis
  namespace: cache
  port: \"6379:18081\"
  env-file: redis.env
",
    )
    .unwrap();
    let mut servers = Vec::new();
    for (port, tag) in [(18080, "web-developer"), (18081, "redis-developer")] {
        let mut server = Command::new(testserver_bin());
        server
            .args(["--netns", &dev, "http", &format!("127.0.0.1:{port}")])
            .env("TAG", tag);
        let mut server = Bg::spawn(&mut server);
        server
            .wait_event(Duration::from_secs(5), |e| e["event"] == "ready")
            .expect("developer server");
        servers.push(server);
    }

    // `up` from a subdirectory, nothing named but the scope: the project
    // file gives the kubeconfig, the namespace and the intercepts; the
    // flag's transport beats the file's and the environment's.
    let cg = TestCgroup::new();
    let instance = Instance(unique_name("cf"));
    let v = ok(
        tpbpf_in(
            &root.0.join("services/web"),
            &[("TPBPF_TRANSPORT", "direct")],
            &[
                "--netns",
                &dev,
                "up",
                "--instance",
                &instance.0,
                "--cgroup",
                &cg.path().display().to_string(),
                "--transport",
                "portforward",
                "-o",
                "json",
            ],
        ),
        "up with a project file",
    );
    println!("up: {v}");
    assert_eq!(v["cluster"]["namespaces"][0], "default", "{v}");
    let upstream = v["bridge"]["upstream"].as_str().unwrap_or_default();
    assert!(upstream.contains("port-forward"), "{v}");

    let list = ok(
        tpbpf_in(
            &root.0,
            &[],
            &["list", "--instance", &instance.0, "-o", "json"],
        ),
        "list",
    );
    let in_cache = ok(
        tpbpf_in(
            &root.0,
            &[],
            &[
                "list",
                "-n",
                "cache",
                "--instance",
                &instance.0,
                "-o",
                "json",
            ],
        ),
        "list -n cache",
    );
    let intercepted: Vec<String> = [&list, &in_cache]
        .iter()
        .flat_map(|l| l["workloads"].as_array().cloned().unwrap_or_default())
        .flat_map(|w| w["intercepts"].as_array().cloned().unwrap_or_default())
        .filter_map(|i| i["name"].as_str().map(str::to_string))
        .collect();
    assert!(
        intercepted.contains(&"web-80".to_string())
            && intercepted.contains(&"redis-6379".to_string()),
        "{list} {in_cache}"
    );
    let client = format!("{}-db-postgres-0", lab.name);
    let got = curl_from(&client, "http://10.96.0.20/");
    assert!(got.contains("web-developer"), "{got}");
    let got = curl_from(&client, "http://10.244.2.20:6379/");
    assert!(got.contains("redis-developer"), "{got}");
    // The env file, relative to the project file.
    assert!(
        root.0.join("redis.env").is_file(),
        "no redis.env beside the project file"
    );

    // down ends the bridge and both intercepts: the pods answer again.
    ok(
        tpbpf_in(
            &root.0,
            &[],
            &["down", "--instance", &instance.0, "-o", "json"],
        ),
        "down",
    );
    for ns in [
        format!("{}-default-web-7d4b9c-a1", lab.name),
        format!("{}-default-web-7d4b9c-b2", lab.name),
        format!("{}-cache-redis-0", lab.name),
    ] {
        assert!(
            wait_for(Duration::from_secs(5), || sk_lookup_links_in(&ns)
                .is_empty()),
            "an intercept stayed attached in {ns} after down"
        );
    }
    let got = curl_from(&client, "http://10.96.0.20/");
    assert!(got.contains("served by nginx"), "after down: {got}");
    let mut redis = connect_in(&client, "10.244.2.20:6379");
    std::io::Write::write_all(&mut redis, b"PING\r\n").unwrap();
    let mut pong = [0u8; 7];
    std::io::Read::read_exact(&mut redis, &mut pong).unwrap();
    assert_eq!(&pong, b"+PONG\r\n");
}
