//! `tpbpf intercept` end to end in the lab: after `tpbpf up`, a deployment's
//! incoming connections (both replicas, on both nodes) come to a server on
//! the developer machine; nginx keeps its pid and the connections it had;
//! `leave` gives them back; an agent's death gives them back at once; and
//! nothing stays attached in the pods' namespaces.
use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use tpbpf_vm_tests::*;

fn tpbpf(args: &[&str]) -> std::process::Output {
    Command::new(tpbpf_bin()).args(args).output().unwrap()
}

/// `tpbpf ARGS`, which must succeed.
fn tpbpf_ok(args: &[&str]) -> std::process::Output {
    let out = tpbpf(args);
    assert!(
        out.status.success(),
        "tpbpf {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `tpbpf up` in the lab's developer namespace, bridging `cg`.
fn bring_up(lab: &LabGuard, cg: &TestCgroup, instance: &Instance) {
    bring_up_as(lab, &lab.kubeconfig(), cg, instance);
}

/// [`bring_up`] with another identity's kubeconfig.
fn bring_up_as(lab: &LabGuard, kubeconfig: &str, cg: &TestCgroup, instance: &Instance) {
    tpbpf_ok(&[
        "--netns",
        &lab.dev_netns(),
        "up",
        "--kubeconfig",
        kubeconfig,
        "--instance",
        &instance.0,
        "--cgroup",
        &cg.path().display().to_string(),
    ]);
}

/// [`bring_up`], and the developer's server (`mode`: http or http11) on its loopback, port 18080.
fn up_with_server(lab: &LabGuard, cg: &TestCgroup, instance: &Instance, mode: &str) -> Bg {
    bring_up(lab, cg, instance);
    let dev = lab.dev_netns();
    let mut server = Command::new(testserver_bin());
    server
        .args(["--netns", &dev, mode, "127.0.0.1:18080"])
        .env("TAG", "developer");
    let mut server = Bg::spawn(&mut server);
    server
        .wait_event(Duration::from_secs(5), |e| e["event"] == "ready")
        .expect("developer server");
    server
}

#[test]
fn intercept_sends_a_deployments_connections_to_the_developer_and_gives_them_back() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("tx") else {
        return;
    };
    let dev = lab.dev_netns();
    let pods = [
        (
            format!("{}-default-web-7d4b9c-a1", lab.name),
            "default-web-7d4b9c-a1",
            "10.244.1.10",
        ),
        (
            format!("{}-default-web-7d4b9c-b2", lab.name),
            "default-web-7d4b9c-b2",
            "10.244.2.10",
        ),
    ];
    let client_pod = format!("{}-cache-redis-0", lab.name);
    let nginx_pid = |dir: &str| {
        std::fs::read_to_string(format!("/run/tpbpf-lab/{}/{dir}/server.pid", lab.name)).unwrap()
    };
    let pids_before: Vec<String> = pods.iter().map(|p| nginx_pid(p.1)).collect();

    let cg = TestCgroup::new();
    let instance = Instance(unique_name("ix"));
    // The developer's server, on the developer machine's loopback.
    let _server = up_with_server(&lab, &cg, &instance, "http");

    // A keep-alive connection to nginx opened before the intercept.
    let mut before = connect_in(&client_pod, "10.244.1.10:80");
    assert!(http_get(&mut before).contains("served by nginx"));

    // The pod's environment goes to --env-file; a symlink planted at that
    // path is replaced, never followed.
    let env_dir = TempDir::new("tpbpf-env");
    let victim = env_dir.0.join("victim");
    std::fs::write(&victim, "untouched\n").unwrap();
    let env_file = env_dir.0.join("web.env");
    std::os::unix::fs::symlink(&victim, &env_file).unwrap();
    let out = tpbpf_ok(&[
        "intercept",
        "web",
        "--port",
        "80:18080",
        "--instance",
        &instance.0,
        "-o",
        "json",
        "--env-file",
        env_file.to_str().unwrap(),
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pods"].as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched\n");
    let meta = std::fs::symlink_metadata(&env_file).unwrap();
    assert!(meta.is_file(), "--env-file followed a symlink");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let env = std::fs::read_to_string(&env_file).unwrap();
    // nginx's own environment: the pod spec's, not the machine's.
    assert!(
        env.contains("WEB_GREETING=hello from the lab") && env.contains("WEB_COLOR=blue"),
        "{env}"
    );
    assert!(!env.contains("SUDO_") && !env.contains("CARGO"), "{env}");
    for (ns, _, _) in &pods {
        assert_eq!(
            sk_lookup_links_in(ns).len(),
            1,
            "no intercept attached in {ns}"
        );
    }

    // From another pod, through the service and to each pod: the developer.
    for _ in 0..4 {
        let got = curl_from(&client_pod, "http://10.96.0.20/");
        assert!(got.contains("developer"), "{got}");
    }
    for (_, _, ip) in &pods {
        let got = curl_from(&client_pod, &format!("http://{ip}/"));
        assert!(got.contains("developer"), "{ip}: {got}");
    }
    // From the developer machine, by name, through tpbpf.
    let resolv = std::env::temp_dir().join(format!("{}.resolv.conf", lab.name));
    std::fs::write(&resolv, "nameserver 127.0.0.53\n").unwrap();
    let r = bridged_shell(
        cg.path(),
        &dev,
        &resolv,
        "curl -sS -m 5 http://web.default/",
    )
    .output()
    .unwrap();
    let _ = std::fs::remove_file(&resolv);
    assert!(
        String::from_utf8_lossy(&r.stdout).contains("developer"),
        "{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    // The connection opened before stays with nginx; nginx was not touched.
    assert!(
        http_get(&mut before).contains("served by nginx"),
        "an existing connection moved"
    );
    let pids: Vec<String> = pods.iter().map(|p| nginx_pid(p.1)).collect();
    assert_eq!(pids, pids_before, "nginx restarted");

    // The transports die (killed in the kernel): the sessions resume and
    // the intercepts come back by themselves (while a session is away its
    // pod answers its own traffic).
    assert!(kill_transports(&dev) > 0, "no transport to kill");
    let t = Instant::now();
    assert!(
        wait_for(Duration::from_secs(10), || curl_from(
            &client_pod,
            "http://10.96.0.20/"
        )
        .contains("developer")),
        "the intercept did not come back after the transport was cut"
    );
    println!(
        "intercept back {:?} after the transports were cut",
        t.elapsed()
    );
    for _ in 0..3 {
        let got = curl_from(&client_pod, "http://10.96.0.20/");
        assert!(got.contains("developer"), "after a transport kill: {got}");
    }

    let list = tpbpf(&["list", "--instance", &instance.0, "-o", "json"]);
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    let web = list["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "web")
        .cloned()
        .unwrap();
    assert_eq!(web["intercepts"][0]["name"], "web-80", "{list}");

    // leave returns once the pods have their port back: the very next
    // request is nginx's, and nothing stays attached.
    tpbpf_ok(&["leave", "web-80", "--instance", &instance.0]);
    let got = curl_from(&client_pod, "http://10.96.0.20/");
    assert!(got.contains("served by nginx"), "right after leave: {got}");
    for (ns, _, ip) in &pods {
        assert!(
            sk_lookup_links_in(ns).is_empty(),
            "intercept left attached in {ns} after leave returned"
        );
        let got = curl_from(&client_pod, &format!("http://{ip}/"));
        assert!(got.contains("served by nginx"), "{got}");
    }

    // Again, then the agents die: within a second nginx answers, none hangs.
    tpbpf_ok(&[
        "intercept",
        "web",
        "--port",
        "80:18080",
        "--instance",
        &instance.0,
    ]);
    assert!(curl_from(&client_pod, "http://10.244.1.10/").contains("developer"));
    for node in ["node1", "node2"] {
        let pid: i32 =
            std::fs::read_to_string(format!("/run/tpbpf-lab/{}/agent-{node}.pid", lab.name))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
        // SAFETY: an agent of this test's lab.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let t = Instant::now();
    for (ns, _, ip) in &pods {
        assert!(
            wait_for(Duration::from_secs(1), || sk_lookup_links_in(ns).is_empty()),
            "intercept left attached in {ns} after the agent died"
        );
        let got = curl_from(&client_pod, &format!("http://{ip}/"));
        assert!(got.contains("served by nginx"), "{got}");
    }
    println!(
        "pods answered by nginx again {:?} after the agents died",
        t.elapsed()
    );
    let pids: Vec<String> = pods.iter().map(|p| nginx_pid(p.1)).collect();
    assert_eq!(pids, pids_before, "nginx restarted");
}

/// Sends `request` on a keep-alive connection and reads one response
/// (Content-Length framed).
fn exchange(stream: &mut TcpStream, request: &str) -> String {
    stream.write_all(request.as_bytes()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .and_then(|v| v.trim().parse::<usize>().ok())
                })
                .unwrap_or(0);
            if body.len() >= len {
                return text;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&buf).into_owned(),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[test]
fn http_filtered_intercepts_and_mirrors() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("th") else {
        return;
    };
    let client_pod = format!("{}-cache-redis-0", lab.name);
    let web_a = format!("{}-default-web-7d4b9c-a1", lab.name);
    let cg = TestCgroup::new();
    let instance = Instance(unique_name("ih"));
    let mut server = up_with_server(&lab, &cg, &instance, "http11");

    // A port nothing in the pod listens on: the developer serves it. The
    // workload is a bare pod here, in another namespace.
    let client_of_redis = format!("{}-default-web-7d4b9c-b2", lab.name);
    assert!(!curl_from(&client_of_redis, "http://10.244.2.20:9999/").contains("developer"));
    tpbpf_ok(&[
        "intercept",
        "redis-0",
        "-n",
        "cache",
        "--port",
        "9999:18080",
        "--instance",
        &instance.0,
    ]);
    let got = curl_from(&client_of_redis, "http://10.244.2.20:9999/");
    assert!(got.contains("developer"), "{got}");
    tpbpf_ok(&["leave", "redis-0-9999", "--instance", &instance.0]);

    // Header filter: requests with x-dev: me come to the developer.
    tpbpf_ok(&[
        "intercept",
        "web",
        "--port",
        "80:18080",
        "--http-header",
        "x-dev=me",
        "--instance",
        &instance.0,
    ]);
    let with = Command::new("ip")
        .args([
            "netns",
            "exec",
            &client_pod,
            "curl",
            "-sS",
            "-m",
            "3",
            "-H",
            "x-dev: me",
            "http://10.244.1.10/",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&with.stdout).contains("developer"));
    assert!(curl_from(&client_pod, "http://10.244.1.10/").contains("served by nginx"));
    // Over one keep-alive connection, request by request.
    let mut conn = connect_in(&client_pod, "10.244.1.10:80");
    let plain = "GET / HTTP/1.1\r\nHost: web\r\n\r\n";
    let marked = "GET / HTTP/1.1\r\nHost: web\r\nX-Dev: me\r\n\r\n";
    for (req, want) in [
        (plain, "served by nginx"),
        (marked, "developer"),
        (plain, "served by nginx"),
        (marked, "developer"),
    ] {
        let got = exchange(&mut conn, req);
        assert!(got.contains(want), "wanted {want}, got {got}");
    }
    drop(conn);
    // A second developer may filter the same port; a steal is refused.
    let steal = tpbpf(&[
        "intercept",
        "web",
        "--port",
        "80:18080",
        "--name",
        "web-steal",
        "--instance",
        &instance.0,
    ]);
    assert!(!steal.status.success());
    let err = String::from_utf8_lossy(&steal.stderr);
    assert!(err.contains("already intercepted"), "{err}");
    tpbpf_ok(&["leave", "web-80", "--instance", &instance.0]);
    assert!(curl_from(&client_pod, "http://10.244.1.10/").contains("served by nginx"));

    // Mirror: nginx answers, the developer gets a copy of each request.
    tpbpf_ok(&[
        "intercept",
        "web",
        "--port",
        "80:18080",
        "--mode",
        "mirror",
        "--instance",
        &instance.0,
    ]);
    for i in 0..3 {
        let got = curl_from(&client_pod, &format!("http://10.244.1.10/mirror-{i}"));
        assert!(got.contains("served by nginx"), "{got}");
        server
            .wait_event(Duration::from_secs(3), |e| {
                e["event"] == "request" && e["request"] == format!("GET /mirror-{i} HTTP/1.1")
            })
            .unwrap_or_else(|| panic!("the developer got no copy of request {i}"));
    }
    tpbpf_ok(&["leave", "web-80", "--instance", &instance.0]);
    assert!(
        wait_for(Duration::from_secs(2), || sk_lookup_links_in(&web_a)
            .is_empty()),
        "intercept left attached"
    );

    // tpbpfd killed with an intercept in place: the pod answers its own
    // traffic at once (fail-open while the session is away), and the agent
    // drops the intercept when the session's resume window (5 s in the lab)
    // passes.
    tpbpf_ok(&[
        "intercept",
        "web",
        "--port",
        "80:18080",
        "--instance",
        &instance.0,
    ]);
    assert_eq!(sk_lookup_links_in(&web_a).len(), 1);
    let st = tpbpf(&["status", "-o", "json", "--instance", &instance.0]);
    let pid = serde_json::from_slice::<Value>(&st.stdout).unwrap()["pid"]
        .as_i64()
        .unwrap() as libc::pid_t;
    assert!(curl_from(&client_pod, "http://10.244.1.10/").contains("developer"));
    // SAFETY: the tpbpfd this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let t = Instant::now();
    assert!(
        wait_for(Duration::from_secs(1), || curl_from(
            &client_pod,
            "http://10.244.1.10/"
        )
        .contains("served by nginx")),
        "the pod did not answer its own traffic within 1 s of tpbpfd's death"
    );
    println!(
        "the pod answered its own traffic {:?} after tpbpfd was killed",
        t.elapsed()
    );
    assert!(
        wait_for(Duration::from_secs(10), || sk_lookup_links_in(&web_a)
            .is_empty()),
        "intercept left attached after tpbpfd died"
    );
    println!(
        "intercept removed {:?} after tpbpfd was killed",
        t.elapsed()
    );
    assert!(curl_from(&client_pod, "http://10.244.1.10/").contains("served by nginx"));
    run(Command::new(tpbpf_bin()).args(["down", "--instance", &instance.0]));
    bring_up(&lab, &cg, &instance);

    // `tpbpf down` with an intercept in place: the agents drop it at once.
    tpbpf_ok(&[
        "intercept",
        "web",
        "--port",
        "80:18080",
        "--instance",
        &instance.0,
    ]);
    assert_eq!(sk_lookup_links_in(&web_a).len(), 1);
    tpbpf_ok(&["down", "--instance", &instance.0]);
    assert!(
        wait_for(Duration::from_secs(2), || sk_lookup_links_in(&web_a)
            .is_empty()),
        "intercept left attached after tpbpf down"
    );
    assert!(curl_from(&client_pod, "http://10.244.1.10/").contains("served by nginx"));
}

#[test]
fn an_intercept_needs_the_right_to_change_the_pod() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("tr") else {
        return;
    };
    // The lab's developer (a token) may patch pods in `default` and
    // `tpbpf-system` only, as a namespace-scoped RBAC role would allow;
    // the agent asks the API server, for that user.
    let restricted = format!("/run/tpbpf-lab/{}/kubeconfig-restricted", lab.name);
    let cg = TestCgroup::new();
    let instance = Instance(unique_name("ir"));
    bring_up_as(&lab, &restricted, &cg, &instance);
    // Installing takes cluster-admin: the restricted identity may not.
    let install = tpbpf(&[
        "--netns",
        &lab.dev_netns(),
        "install",
        "--kubeconfig",
        &restricted,
        "--timeout-s",
        "5",
    ]);
    let err = String::from_utf8_lossy(&install.stderr);
    assert!(
        !install.status.success(),
        "a restricted identity installed tpbpf"
    );
    assert!(
        err.contains("forbidden") && err.contains("cluster-admin"),
        "{err}"
    );
    let refused = tpbpf(&[
        "intercept",
        "redis-0",
        "-n",
        "cache",
        "--port",
        "6379:16379",
        "--instance",
        &instance.0,
    ]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("lab-developer may not patch pods cache/redis-0"),
        "{err}"
    );
    let redis_ns = format!("{}-cache-redis-0", lab.name);
    assert!(sk_lookup_links_in(&redis_ns).is_empty());
    tpbpf_ok(&[
        "intercept",
        "web",
        "--port",
        "80:18080",
        "--instance",
        &instance.0,
    ]);
    let web_a = format!("{}-default-web-7d4b9c-a1", lab.name);
    assert_eq!(sk_lookup_links_in(&web_a).len(), 1);
}

/// The agent's resident memory, KiB.
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A 1 GiB upload through an HTTP-filtered intercept streams: the agent's
/// memory stays flat (measured, printed), and every byte arrives.
#[test]
fn a_gigabyte_upload_through_a_filtered_intercept_keeps_the_agent_flat() {
    use std::io::{Read, Write};
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("tg") else {
        return;
    };
    let client_pod = format!("{}-cache-redis-0", lab.name);
    let cg = TestCgroup::new();
    let instance = Instance(unique_name("ig"));
    let mut server = up_with_server(&lab, &cg, &instance, "upload");
    tpbpf_ok(&[
        "intercept",
        "web",
        "--port",
        "80:18080",
        "--http-header",
        "x-dev=me",
        "--instance",
        &instance.0,
    ]);
    let agent: i32 =
        std::fs::read_to_string(format!("/run/tpbpf-lab/{}/agent-node1.pid", lab.name))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    let before = rss_kib(agent);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_kib(agent));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    // 1 GiB; `TPBPF_TEST_UPLOAD_MIB` makes it smaller where the machine is
    // emulated (`cargo xtask vm-test` under TCG sets 256: still four times
    // the growth the agent is allowed, so a buffer that follows the upload
    // shows).
    let mib: u64 = std::env::var("TPBPF_TEST_UPLOAD_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let len: u64 = mib << 20;
    let t = Instant::now();
    let mut conn = connect_in(&client_pod, "10.244.1.10:80");
    write!(
        conn,
        "POST /upload HTTP/1.1\r\nHost: web\r\nx-dev: me\r\nContent-Length: {len}\r\n\r\n"
    )
    .unwrap();
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        conn.write_all(&chunk).unwrap();
    }
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    // The answer closes the connection: read it whole.
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    let elapsed = t.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    let answer = String::from_utf8_lossy(&answer);
    println!(
        "{mib} MiB through a filtered intercept in {elapsed:?}: agent RSS {before} KiB before, peak {peak} KiB"
    );
    assert!(answer.contains(&format!("received {len}")), "{answer}");
    assert!(
        server
            .wait_event(Duration::from_secs(5), |e| e["event"] == "upload"
                && e["bytes"] == len)
            .is_some(),
        "the developer's server did not get every byte"
    );
    assert!(
        peak < before + 64 * 1024,
        "the agent grew from {before} KiB to {peak} KiB during the upload"
    );
}

/// A Deployment whose selector has only `matchExpressions` (the lab's
/// postgres) selects exactly its pods, through the API's set-based
/// selectors and tpbpf's reading of them.
#[test]
fn a_selector_with_only_match_expressions_selects_exactly_its_pods() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("te") else {
        return;
    };
    let names = |selector: &str| -> Vec<String> {
        let path = format!("/api/v1/pods?labelSelector={selector}");
        let v: Value = serde_json::from_str(&lab.api_get(&path)).unwrap();
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_string))
            .collect()
    };
    assert_eq!(names("app%20in%20(postgres)"), ["postgres-0"]);
    assert_eq!(names("app%20in%20(postgres,redis)").len(), 2);
    assert!(!names("app%20notin%20(postgres)").contains(&"postgres-0".to_string()));
    assert!(names("!app").is_empty());

    let cg = TestCgroup::new();
    let instance = Instance(unique_name("ie"));
    bring_up(&lab, &cg, &instance);
    let out = tpbpf_ok(&[
        "intercept",
        "postgres",
        "-n",
        "db",
        "--port",
        "5432:15432",
        "--instance",
        &instance.0,
        "-o",
        "json",
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let pods: Vec<&str> = v["pods"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(pods, ["postgres-0"], "{v}");
    tpbpf_ok(&["leave", "postgres-5432", "--instance", &instance.0]);
}

/// An intercept follows its workload: a replaced pod (a new name and a new
/// address, as after a delete or a rollout) is intercepted within two
/// seconds of answering, the old one is released, and `leave` gives the new
/// one back.
#[test]
fn an_intercept_follows_its_deployment_when_a_pod_is_replaced() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("tf") else {
        return;
    };
    let client_pod = format!("{}-cache-redis-0", lab.name);
    let cg = TestCgroup::new();
    let instance = Instance(unique_name("if"));
    let _server = up_with_server(&lab, &cg, &instance, "http");
    let out = tpbpf_ok(&[
        "intercept",
        "deployment/web",
        "--port",
        "80:18080",
        "--instance",
        &instance.0,
        "-o",
        "json",
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kind"], "deployment", "{v}");
    assert_eq!(v["pods"].as_array().map(Vec::len), Some(2), "{v}");
    assert!(curl_from(&client_pod, "http://10.244.1.10/").contains("developer"));

    // The pod is replaced; `lab restart` returns once the new nginx answers.
    let out = tpbpf_ok(&[
        "lab",
        "--name",
        &lab.name,
        "restart",
        "web-7d4b9c-a1",
        "-o",
        "json",
    ]);
    let answering = Instant::now();
    let new: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (new_name, new_ip) = (
        new["new"].as_str().unwrap().to_string(),
        new["pod_ip"].as_str().unwrap().to_string(),
    );
    assert_ne!(new_ip, "10.244.1.10");
    let url = format!("http://{new_ip}/");
    let mut last = String::new();
    let taken = wait_for(scaled(Duration::from_secs(10)), || {
        last = curl_from(&client_pod, &url);
        last.contains("developer")
    });
    let took = answering.elapsed();
    assert!(
        taken,
        "the new pod {new_name} was never intercepted: {last}"
    );
    println!("new pod {new_name} ({new_ip}) intercepted {took:?} after it answered");
    assert!(
        took < scaled(Duration::from_secs(2)),
        "the new pod took {took:?} to be intercepted (more than 2 s, scaled by TPBPF_TEST_TIME_SCALE)"
    );
    let new_netns = format!("{}-default-{new_name}", lab.name);
    assert_eq!(sk_lookup_links_in(&new_netns).len(), 1);

    // `list` shows the pods intercepted now: the new one, not the old.
    let list = tpbpf_ok(&["list", "--instance", &instance.0, "-o", "json"]);
    let v: Value = serde_json::from_slice(&list.stdout).unwrap();
    let web = v["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "web")
        .cloned()
        .unwrap();
    let pods = sorted_strings(&web["intercepts"][0]["pods"]);
    let mut want = [new_name.as_str(), "web-7d4b9c-b2"];
    want.sort_unstable();
    assert_eq!(pods, want, "{web}");

    tpbpf_ok(&["leave", "deployment-web-80", "--instance", &instance.0]);
    let got = curl_from(&client_pod, &url);
    assert!(got.contains(&format!("hello from {new_name}")), "{got}");
    assert!(sk_lookup_links_in(&new_netns).is_empty());
}

/// The control socket is a bridge's alone: mode 0600 (0660 with a `tpbpf`
/// group), and even when its file mode lets another user in, tpbpfd checks
/// the peer's uid (`SO_PEERCRED`); requests are typed and bounded.
#[test]
fn the_control_socket_serves_only_its_owner_and_bounds_requests() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("tk") else {
        return;
    };
    let cg = TestCgroup::new();
    let instance = Instance(unique_name("ik"));
    bring_up(&lab, &cg, &instance);
    let socket = std::path::Path::new("/run/tpbpf")
        .join(&instance.0)
        .join("control.sock");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert!(
        mode == 0o600 || mode == 0o660,
        "control socket mode {mode:o}"
    );

    // Another user, let in by a careless chmod: refused by tpbpfd itself.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf '{{\"op\":\"list\"}}\\n' | setpriv --reuid=65534 --regid=65534 --clear-groups socat -t 10 - UNIX-CONNECT:{}",
            socket.display()
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stdout);
    assert!(err.contains("belongs to root"), "{err}");
    // Root still may.
    tpbpf_ok(&["list", "--instance", &instance.0]);

    let exchange = |bytes: &[u8]| -> String {
        use std::os::unix::net::UnixStream;
        let mut s = UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let _ = s.write_all(bytes);
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    };
    // Too long, unknown operations, wrong types, oversized names: refused.
    let long = vec![b'x'; 70 * 1024];
    assert!(exchange(&long).contains("at most 65536 bytes"));
    assert!(exchange(b"{\"op\":\"explode\"}\n").contains("not a request"));
    assert!(exchange(b"{\"op\":\"intercept\",\"name\":\"a\",\"workload\":\"web\",\"remote\":70000,\"local\":1,\"mode\":\"steal\"}\n").contains("not a request"));
    let huge_name = format!(
        "{{\"op\":\"intercept\",\"name\":\"{}\",\"workload\":\"web\",\"remote\":80,\"local\":18080,\"mode\":\"steal\"}}\n",
        "n".repeat(300)
    );
    assert!(exchange(huge_name.as_bytes()).contains("names are 1 to 253 bytes"));
}

/// Under the relaxed rule (`--intercept-rights port-forward`) a
/// port-forward lets the intercept through, but the pod's environment
/// still asks what reading it would: the web pods take `WEB_API_TOKEN`
/// from Secret `web-api`, so the lab's forwarder (port-forward only)
/// intercepts without it (told why, no env file written, the value
/// nowhere), and the developer (`create pods/exec` in `default`) gets it.
#[test]
fn with_port_forward_rights_the_environment_still_asks_for_exec_or_its_secrets() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up_without_agent("tf") else {
        return;
    };
    lab.install_with(&["--intercept-rights", "port-forward"]);
    let secret = tpbpf_lab::spec::WEB_API_TOKEN;
    let dir = TempDir::new("tpbpf-env");
    let intercept_as = |kubeconfig: &str, env_file: &std::path::Path| {
        let cg = TestCgroup::new();
        let instance = Instance(unique_name("if"));
        bring_up_as(&lab, kubeconfig, &cg, &instance);
        let out = tpbpf(&[
            "intercept",
            "web",
            "--port",
            "80:18080",
            "--instance",
            &instance.0,
            "-o",
            "json",
            "--env-file",
            env_file.to_str().unwrap(),
        ]);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(out.status.success(), "intercept: {stderr}");
        (stdout, stderr)
    };
    let forwarder = format!("/run/tpbpf-lab/{}/kubeconfig-forwarder", lab.name);
    let env_file = dir.0.join("forwarder.env");
    let (stdout, stderr) = intercept_as(&forwarder, &env_file);
    let v: Value = serde_json::from_str(&stdout).unwrap();
    let why = v["env_withheld"].as_str().unwrap_or_default();
    assert!(
        why.contains("lab-forwarder may neither exec into the pod") && why.contains(secret.secret),
        "{v}"
    );
    assert!(
        stderr.contains("not written") && !env_file.exists(),
        "{stderr}"
    );
    assert!(
        !stdout.contains(secret.value) && !stderr.contains(secret.value),
        "the secret's value reached the forwarder: {stdout}{stderr}"
    );

    let restricted = format!("/run/tpbpf-lab/{}/kubeconfig-restricted", lab.name);
    let env_file = dir.0.join("developer.env");
    let (stdout, _) = intercept_as(&restricted, &env_file);
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert!(v["env_withheld"].is_null(), "{v}");
    let env = std::fs::read_to_string(&env_file).unwrap();
    assert!(
        env.contains(&format!("{}={}", secret.name, secret.value)),
        "{env}"
    );
}
