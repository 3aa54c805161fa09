//! Intercept in the lab: the agent attaches sk_lookup in a pod's network
//! namespace and takes new connections to its port; nginx keeps running with
//! the same pid, connections opened before keep talking to it, and when the
//! agent dies (SIGKILL) the pod gets its port back at once (fail-open).
use std::{process::Command, time::Duration};

use serde_json::Value;
use tpbpf_vm_tests::*;

#[test]
fn intercept_takes_new_connections_and_the_pod_gets_them_back_when_the_agent_dies() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("ti") else {
        return;
    };
    let (node1, web_a, client_pod) = (
        format!("{}-node1", lab.name),
        format!("{}-default-web-7d4b9c-a1", lab.name),
        format!("{}-cache-redis-0", lab.name),
    );
    let nginx_pid = || {
        std::fs::read_to_string(format!(
            "/run/tpbpf-lab/{}/default-web-7d4b9c-a1/server.pid",
            lab.name
        ))
        .unwrap()
    };
    let pid_before = nginx_pid();

    // The "developer's server", reachable from the node.
    let mut dev = Command::new(testserver_bin());
    dev.args(["--netns", &node1, "http", "172.31.0.11:18080"])
        .env("TAG", "developer");
    let mut dev = Bg::spawn(&mut dev);
    dev.wait_event(Duration::from_secs(5), |e| e["event"] == "ready")
        .expect("developer server");

    assert!(curl_from(&client_pod, "http://10.244.1.10/").contains("served by nginx"));
    // A keep-alive connection opened before the intercept.
    let mut before = connect_in(&client_pod, "10.244.1.10:80");
    assert!(http_get(&mut before).contains("served by nginx"));

    let mut agent = Command::new("ip");
    agent
        .args(["netns", "exec", &node1])
        .arg(agent_bin())
        .args([
            "intercept",
            "--netns",
            &web_a,
            "--target",
            "10.244.1.10:80",
            "--to",
            "172.31.0.11:18080",
        ]);
    let mut agent = Bg::spawn(&mut agent);
    let ready: Value = agent
        .wait_event(Duration::from_secs(10), |e| e["event"] == "ready")
        .expect("agent intercept ready");
    let links: Vec<u64> = ready["link_ids"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(links.len(), 1, "{ready}");
    assert!(kernel_link_ids().contains(&links[0]));

    // New connections go to the developer; the other replica is untouched.
    assert!(curl_from(&client_pod, "http://10.244.1.10/")
        .contains("served-by 172.31.0.11:18080 developer"));
    assert!(curl_from(&client_pod, "http://10.244.2.10/").contains("served by nginx"));
    // Only connections to the pod's own address are steered: the pod's
    // loopback (a sidecar, a probe) still reaches nginx.
    let local = curl_from(&web_a, "http://127.0.0.1/");
    assert!(
        local.contains("served by nginx"),
        "loopback was intercepted: {local}"
    );
    // The connection opened before stays with nginx, and nginx was not touched.
    assert!(
        http_get(&mut before).contains("served by nginx"),
        "an existing connection moved"
    );
    assert_eq!(nginx_pid(), pid_before, "nginx restarted");

    // The agent dies: within a second the pod answers again, nothing attached.
    agent.kill(libc::SIGKILL);
    assert!(agent.wait_exit(Duration::from_secs(2)).is_some());
    assert!(
        wait_for(Duration::from_secs(1), || !kernel_link_ids()
            .contains(&links[0])),
        "sk_lookup link left after the agent died"
    );
    let back = curl_from(&client_pod, "http://10.244.1.10/");
    assert!(back.contains("served by nginx"), "{back}");
    assert_eq!(nginx_pid(), pid_before);
}
