//! Intercepts by port name, of a service, and of several ports at once,
//! through the lab (whose services name their target ports, as charts do:
//! web's `http`, redis's `redis`).
use std::{process::Command, time::Duration};

use serde_json::Value;
use tpbpf_vm_tests::*;

fn tpbpf(args: &[&str]) -> std::process::Output {
    Command::new(tpbpf_bin()).args(args).output().unwrap()
}

fn tpbpf_json(args: &[&str]) -> Value {
    let out = tpbpf(args);
    assert!(
        out.status.success(),
        "tpbpf {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn server(dev: &str, port: u16, tag: &str) -> Bg {
    let mut cmd = Command::new(testserver_bin());
    cmd.args(["--netns", dev, "http", &format!("127.0.0.1:{port}")])
        .env("TAG", tag);
    let mut bg = Bg::spawn(&mut cmd);
    bg.wait_event(Duration::from_secs(5), |e| e["event"] == "ready")
        .expect("developer server");
    bg
}

/// The intercepts' names in `tpbpf list -n NS`.
fn intercepts(instance: &str, ns: &str) -> Vec<(String, u64)> {
    let v = tpbpf_json(&["list", "-n", ns, "--instance", instance, "-o", "json"]);
    v["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|w| w["intercepts"].as_array().cloned().unwrap_or_default())
        .map(|i| {
            (
                i["name"].as_str().unwrap_or("").to_string(),
                i["remote"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn intercepts_by_port_name_of_a_service_and_of_several_ports() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("ip") else {
        return;
    };
    let dev = lab.dev_netns();
    let cg = TestCgroup::new();
    let instance = Instance(unique_name("ip"));
    tpbpf_json(&[
        "--netns",
        &dev,
        "up",
        "--kubeconfig",
        &lab.kubeconfig(),
        "--instance",
        &instance.0,
        "--cgroup",
        &cg.path().display().to_string(),
        "-o",
        "json",
    ]);
    let _a = server(&dev, 18080, "developer-a");
    let _b = server(&dev, 18082, "developer-b");
    let client = format!("{}-db-postgres-0", lab.name);
    let i = instance.0.as_str();

    // A container port by name: web's `http` is 80.
    let v = tpbpf_json(&[
        "intercept",
        "web",
        "--port",
        "http:18080",
        "--instance",
        i,
        "-o",
        "json",
    ]);
    assert_eq!(
        (v["name"].as_str(), v["remote"].as_u64()),
        (Some("web-http"), Some(80)),
        "{v}"
    );
    assert!(curl_from(&client, "http://10.244.1.10/").contains("developer-a"));
    assert_eq!(intercepts(i, "default"), vec![("web-http".to_string(), 80)]);
    assert!(tpbpf(&["leave", "web-http", "--instance", i])
        .status
        .success());

    // A service: its selector's pods; its port `redis` (by name) maps to
    // the pods' target port.
    let v = tpbpf_json(&[
        "intercept",
        "svc/redis",
        "-n",
        "cache",
        "--port",
        "redis:18082",
        "--instance",
        i,
        "-o",
        "json",
    ]);
    assert_eq!(v["kind"], "service", "{v}");
    assert_eq!(v["remote"], 6379, "{v}");
    assert_eq!(v["pods"].as_array().map(Vec::len), Some(1), "{v}");
    assert!(curl_from(&client, "http://10.244.2.20:6379/").contains("developer-b"));
    // A service port it does not have is named with the ones it has.
    let out = tpbpf(&[
        "intercept",
        "svc/redis",
        "-n",
        "cache",
        "--port",
        "9999",
        "--instance",
        i,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("has no port 9999") && err.contains("redis (6379)"),
        "{err}"
    );
    assert!(tpbpf(&["leave", "svc-redis-redis", "--instance", i])
        .status
        .success());

    // Several ports in one command: one intercept each, listed together.
    let v = tpbpf_json(&[
        "intercept",
        "web",
        "--port",
        "80:18080",
        "--port",
        "8080:18082",
        "--instance",
        i,
        "-o",
        "json",
    ]);
    let names: Vec<&str> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x["name"].as_str())
        .collect();
    assert_eq!(names, ["web-80", "web-8080"], "{v}");
    assert!(curl_from(&client, "http://10.244.2.10/").contains("developer-a"));
    assert!(curl_from(&client, "http://10.244.2.10:8080/").contains("developer-b"));
    for n in ["web-80", "web-8080"] {
        assert!(tpbpf(&["leave", n, "--instance", i]).status.success());
    }

    // All or none: a bad second port leaves no first intercept behind.
    let out = tpbpf(&[
        "intercept",
        "web",
        "--port",
        "80:18080",
        "--port",
        "nosuch:18082",
        "--instance",
        i,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("port named nosuch"),
        "{err}"
    );
    assert!(
        intercepts(i, "default").is_empty(),
        "{:?}",
        intercepts(i, "default")
    );
    assert!(curl_from(&client, "http://10.244.1.10/").contains("served by nginx"));
    // --name with several ports is ambiguous: refused before anything.
    let out = tpbpf(&[
        "intercept",
        "web",
        "--port",
        "80",
        "--port",
        "81",
        "--name",
        "x",
        "--instance",
        i,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--name names one intercept"));
}
