//! The lab's Kubernetes API endpoint against real clients: kubectl (Debian's)
//! and kube-rs (the client tpbpf uses), including a watch and pod
//! port-forwards: kube-rs over WebSocket, kubectl over SPDY/3.1 (tunneled in
//! WebSocket, and after a plain `Upgrade: SPDY/3.1`).
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    api::{ListParams, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    Api, Client, Config,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tpbpf_vm_tests::*;

#[test]
fn lab_api_serves_kubectl_and_kube_rs_with_watch_and_port_forward() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("ta") else {
        return;
    };
    assert_eq!(lab.status["api_running"], true, "{}", lab.status);
    let (kubeconfig, dev) = (lab.kubeconfig(), lab.dev_netns());

    // kubectl, from the developer machine's namespace.
    let kubectl = |args: &[&str]| {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &dev,
                "kubectl",
                "--kubeconfig",
                &kubeconfig,
            ])
            .args(args)
            .output()
    };
    match kubectl(&["get", "pods", "-A"]) {
        Ok(out) if out.status.success() => {
            let table = String::from_utf8_lossy(&out.stdout);
            assert!(
                table.contains("web-7d4b9c-a1")
                    && table.contains("Running")
                    && table.contains("kube-system"),
                "{table}"
            );
            let out = kubectl(&["get", "services", "-n", "db", "-o", "json"]).unwrap();
            let list: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(
                list["items"][0]["spec"]["clusterIP"], "10.96.0.40",
                "{list}"
            );
            // Over HTTPS, as each identity: the client certificate's CN and
            // O, the token's user.
            for (kc, user, groups) in [
                (
                    kubeconfig.clone(),
                    "kubernetes-admin",
                    vec!["system:masters", "system:authenticated"],
                ),
                (
                    lab.restricted_kubeconfig(),
                    "lab-developer",
                    vec!["system:authenticated"],
                ),
            ] {
                let out = Command::new("ip")
                    .args(["netns", "exec", &dev, "kubectl", "--kubeconfig", &kc])
                    .args(["auth", "whoami", "-o", "json"])
                    .output()
                    .unwrap();
                let who: Value = serde_json::from_slice(&out.stdout)
                    .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
                assert_eq!(who["status"]["userInfo"]["username"], user, "{who}");
                assert_eq!(
                    who["status"]["userInfo"]["groups"],
                    serde_json::json!(groups),
                    "{who}"
                );
            }
        }
        Ok(out) => panic!(
            "kubectl get pods -A failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => println!(
            "kubectl is not installed: skipping its part (sudo bash xtask/setup.sh installs it)"
        ),
    }

    // kube-rs, on a thread inside the developer machine's namespace.
    let handle = std::thread::spawn(move || {
        enter_netns(&dev).expect("entering the developer namespace");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let kc = Kubeconfig::read_from(&kubeconfig).unwrap();
            let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .unwrap();
            let client = Client::try_from(config).unwrap();
            let all: Api<Pod> = Api::all(client.clone());
            let pods = all.list(&ListParams::default()).await.unwrap();
            // Five workload pods and one agent pod per node.
            assert_eq!(pods.items.len(), 7);
            let agents = pods
                .items
                .iter()
                .filter(|p| p.metadata.namespace.as_deref() == Some("tpbpf-system"))
                .count();
            assert_eq!(agents, 2);
            let web: Api<Pod> = Api::namespaced(client.clone(), "default");
            let selected = web
                .list(&ListParams::default().labels("app=web"))
                .await
                .unwrap();
            assert_eq!(selected.items.len(), 2);
            let one = web.get("web-7d4b9c-b2").await.unwrap();
            assert_eq!(one.status.unwrap().pod_ip.as_deref(), Some("10.244.2.10"));
            assert!(
                web.get("nope").await.is_err(),
                "a missing pod must be an error"
            );

            // A watch from scratch sees every pod as ADDED.
            let events: Vec<_> = web
                .watch(&WatchParams::default().timeout(2), "0")
                .await
                .unwrap()
                .take(2)
                .try_collect()
                .await
                .unwrap();
            assert!(
                events.iter().all(|e| matches!(e, WatchEvent::Added(_))),
                "{events:?}"
            );

            // Port-forward to nginx in a pod.
            let mut pf = web.portforward("web-7d4b9c-a1", &[80]).await.unwrap();
            let mut stream = pf.take_stream(80).unwrap();
            stream
                .write_all(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")
                .await
                .unwrap();
            let mut response = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
                .await
                .unwrap()
                .unwrap();
            let text = String::from_utf8_lossy(&response).into_owned();
            assert!(
                text.contains("served by nginx") && text.contains("web-7d4b9c-a1"),
                "{text}"
            );
        });
    });
    handle.join().expect("kube-rs checks");
}

/// A running `kubectl port-forward`, killed on drop (also when the test
/// fails); its stderr goes to a file kept for failure messages.
struct KubectlPortForward {
    child: Child,
    stderr: PathBuf,
    /// The local port kubectl listens on.
    port: u16,
}

impl KubectlPortForward {
    /// `kubectl port-forward <target> :<remote>` in the developer namespace,
    /// once it listens. `websockets` sets KUBECTL_PORT_FORWARD_WEBSOCKETS:
    /// true tunnels SPDY in WebSocket, false makes kubectl ask for the plain
    /// SPDY upgrade.
    fn start(
        dev: &str,
        kubeconfig: &str,
        namespace: &str,
        target: &str,
        remote: u16,
        websockets: bool,
    ) -> Self {
        let stderr =
            std::env::temp_dir().join(format!("{}.kubectl-pf.err", unique_name("tpbpf-lab-api")));
        let child = Command::new("ip")
            .args(["netns", "exec", dev, "kubectl", "--kubeconfig", kubeconfig])
            .args(["-n", namespace, "port-forward", target])
            .arg(format!(":{remote}"))
            .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", websockets.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("kubectl's stderr file"))
            .spawn()
            .expect("starting kubectl port-forward");
        let mut pf = Self {
            child,
            stderr,
            port: 0,
        };
        // "Forwarding from 127.0.0.1:41234 -> 80" once it listens.
        let stdout = pf.child.stdout.take().expect("kubectl's stdout");
        let (tx, rx) = mpsc::channel();
        // Read to the end: kubectl writes a line per connection, and a
        // closed pipe would kill it (SIGPIPE).
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while pf.port == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    pf.port = line
                        .strip_prefix("Forwarding from 127.0.0.1:")
                        .and_then(|rest| rest.split_whitespace().next())
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(0);
                }
                Err(_) => panic!(
                    "kubectl port-forward {target} :{remote} (websockets={websockets}) did not \
                     start listening: {}",
                    pf.stderr_text()
                ),
            }
        }
        pf
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for KubectlPortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr);
    }
}

/// kubectl's own `port-forward` to nginx and redis in lab pods, over both
/// SPDY transports the API server offers kubectl.
#[test]
fn lab_api_serves_kubectl_port_forward_over_spdy() {
    if !require_root() {
        return;
    }
    let Ok(version) = Command::new("kubectl")
        .args(["version", "--client", "-o", "json"])
        .output()
    else {
        skip("kubectl is not installed (sudo bash xtask/setup.sh installs it)");
        return;
    };
    // kubectl tunnels SPDY in WebSocket from 1.30 (by default from 1.31).
    let minor = serde_json::from_slice::<Value>(&version.stdout)
        .ok()
        .and_then(|v| {
            v["clientVersion"]["minor"]
                .as_str()
                .map(|m| m.trim_end_matches('+').parse::<u32>().unwrap_or(0))
        })
        .unwrap_or(0);
    let Some(lab) = LabGuard::up("tk") else {
        return;
    };
    assert_eq!(lab.status["api_running"], true, "{}", lab.status);
    let (kubeconfig, dev) = (lab.kubeconfig(), lab.dev_netns());
    let in_dev = |argv: &[&str]| {
        let out = Command::new("ip")
            .args(["netns", "exec", &dev])
            .args(argv)
            .output()
            .unwrap_or_else(|e| panic!("running {argv:?}: {e}"));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };

    let transports: &[bool] = if minor >= 30 {
        &[true, false]
    } else {
        println!(
            "kubectl 1.{minor} has no SPDY-over-WebSocket tunnel: checking the plain upgrade only"
        );
        &[false]
    };
    for &websockets in transports {
        // nginx in web-7d4b9c-a1, port 80.
        let web = KubectlPortForward::start(
            &dev,
            &kubeconfig,
            "default",
            "pod/web-7d4b9c-a1",
            80,
            websockets,
        );
        let url = format!("http://127.0.0.1:{}/", web.port);
        for _ in 0..2 {
            let (ok, page) = in_dev(&["curl", "-sS", "-m", "10", &url]);
            assert!(
                ok && page.contains("served by nginx") && page.contains("web-7d4b9c-a1"),
                "curl through kubectl port-forward (websockets={websockets}): {page}\nkubectl: {}",
                web.stderr_text()
            );
        }

        // redis in redis-0 (namespace cache), port 6379.
        let redis =
            KubectlPortForward::start(&dev, &kubeconfig, "cache", "pod/redis-0", 6379, websockets);
        let port = redis.port.to_string();
        for _ in 0..2 {
            let (ok, reply) = in_dev(&["timeout", "10", "redis-cli", "-p", &port, "ping"]);
            assert!(
                ok && reply.trim() == "PONG",
                "redis-cli ping through kubectl port-forward (websockets={websockets}): \
                 {reply}\nkubectl: {}",
                redis.stderr_text()
            );
        }
        // kubectl is still forwarding (no error closed its connection).
        for pf in [web, redis] {
            let mut pf = pf;
            assert!(
                pf.child.try_wait().expect("kubectl status").is_none(),
                "kubectl port-forward exited: {}",
                pf.stderr_text()
            );
        }
    }

    // Both transports really were used (kubectl falls back silently).
    let log = std::fs::read_to_string(Path::new(&kubeconfig).with_file_name("api.log"))
        .expect("the lab API's log");
    assert!(
        log.contains("SPDY/3.1 over an HTTP upgrade"),
        "the plain SPDY upgrade was not used:\n{log}"
    );
    if transports.contains(&true) {
        assert!(
            log.contains("SPDY/3.1 tunneled in WebSocket"),
            "kubectl did not tunnel SPDY in WebSocket:\n{log}"
        );
    }
}
