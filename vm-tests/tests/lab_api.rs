//! The lab's Kubernetes API endpoint against real clients: kubectl (Debian's)
//! and kube-rs (the client tpbpf uses), including a watch and a pod
//! port-forward over WebSocket.
use std::{process::Command, time::Duration};

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
    if !require_root("lab_api_serves_kubectl_and_kube_rs_with_watch_and_port_forward") {
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
