//! The agent on a node, attacked by a developer who holds a tunnel: it may
//! reach what a pod could reach and nothing of the node (loopback, cloud
//! metadata, the node's own addresses, anything outside the cluster), and
//! its tunnel credentials are per session. Through the lab, from the
//! developer machine's namespace, with tpbpf's own client code.
mod common;

use std::{future::Future, net::SocketAddr, process::Command, sync::Arc, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tpbpf_mux::{transport::TlsConnector, Client, Config, Destination, InterceptMode};
use tpbpf_vm_tests::*;

/// Runs `f` with a kube client for the lab, on a thread inside the
/// developer machine's namespace (the only one that reaches the API).
fn as_developer<F, Fut>(lab: &LabGuard, f: F)
where
    F: FnOnce(kube::Client) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    common::with_admin_client(lab, f)
}

/// Fresh credentials from `pod` and a session opened with them, over a
/// port-forward.
async fn session(client: &kube::Client, pod: &str) -> (tpbpf_mux::Session, String) {
    let creds = tpbpf_kube::agent_credentials(client, pod)
        .await
        .expect("credentials through a port-forward");
    let session = connect(client, pod, &creds, &creds.token).await.unwrap();
    (session, creds.token)
}

async fn connect(
    client: &kube::Client,
    pod: &str,
    creds: &tpbpf_kube::AgentCredentials,
    token: &str,
) -> Result<tpbpf_mux::Session, String> {
    let pf = tpbpf_kube::PortForward::new(client, pod, creds.tunnel_port);
    let tls = TlsConnector::over(Arc::new(pf), &creds.fingerprint).unwrap();
    Client::connect(Arc::new(tls), token.as_bytes().to_vec(), Config::default())
        .await
        .map_err(|e| e.to_string())
}

/// Opens a stream to `addr` through the agent with an HTTP request; what
/// came back, or the error the agent reset it with.
async fn through(session: &tpbpf_mux::Session, addr: &str) -> Result<String, String> {
    let addr: SocketAddr = addr.parse().unwrap();
    let mut s = session
        .open_with(Destination::Addr(addr), b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let _ = s.flush().await;
    let mut got = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await {
        Ok(Ok(_)) => Ok(String::from_utf8_lossy(&got).into_owned()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer in 10 s".into()),
    }
}

#[test]
fn the_agent_dials_only_the_cluster_never_the_node() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("tg") else {
        return;
    };
    // A "metadata server" on node1: were the agent to dial it, it would answer.
    let node1 = format!("{}-node1", lab.name);
    run(Command::new("ip").args([
        "-n",
        &node1,
        "addr",
        "add",
        "169.254.169.254/32",
        "dev",
        "lo",
    ]));
    let _metadata = Bg::spawn(Command::new("ip").args([
        "netns",
        "exec",
        &node1,
        "socat",
        "TCP-LISTEN:80,bind=169.254.169.254,fork,reuseaddr",
        "SYSTEM:echo node-credentials",
    ]));
    as_developer(&lab, |client| async move {
        let (session, _) = session(&client, "tpbpf-agent-node1").await;
        // What a pod could reach works: a service and a pod address.
        for ok in ["10.96.0.20:80", "10.244.2.10:80"] {
            let got = through(&session, ok).await;
            assert!(
                got.as_ref().is_ok_and(|b| b.contains("served by nginx")),
                "{ok}: {got:?}"
            );
        }
        for (addr, why) in [
            ("169.254.169.254:80", "link-local"),
            ("127.0.0.1:4390", "loopback"),
            ("172.31.0.11:4390", "the node's own addresses"),
            ("172.31.0.12:22", "outside the cluster's ranges"),
            ("192.0.2.1:80", "outside the cluster's ranges"),
        ] {
            let got = through(&session, addr).await;
            let e = got.expect_err(&format!("the agent dialed {addr}"));
            assert!(
                e.contains("may not dial") && e.contains(why),
                "{addr}: the refusal must say why ({why}): {e}"
            );
        }
    });
}

/// `curl http://10.96.0.20/` from pod redis-0: what nginx (or an
/// intercept) answers.
fn from_a_pod(lab: &LabGuard) -> String {
    curl_from(&format!("{}-cache-redis-0", lab.name), "http://10.96.0.20/")
}

#[test]
fn an_intercept_challenge_answered_through_the_tunnel_is_refused() {
    if !require_root() {
        return;
    }
    // The relaxed rule, whose proof is a port-forward into the pod.
    let Some(lab) = LabGuard::up_without_agent("tc") else {
        return;
    };
    lab.install_with(&["--intercept-rights", "port-forward"]);
    let web_a = format!("{}-default-web-7d4b9c-a1", lab.name);
    as_developer(&lab, |client| async move {
        let (session, _) = session(&client, "tpbpf-agent-node1").await;
        // The attacker answers the challenge itself, through tunnel streams
        // to the pod's address and to loopback, instead of a port-forward
        // through the API server.
        let s2 = session.clone();
        let got = session
            .intercept(
                "10.244.1.10:80".parse().unwrap(),
                InterceptMode::Steal,
                Duration::from_secs(30),
                move |port, nonce| {
                    let s2 = s2.clone();
                    async move {
                        for ip in ["10.244.1.10", "127.0.0.1"] {
                            let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
                            if let Ok(mut s) = s2.open_with(Destination::Addr(addr), &nonce) {
                                let _ = s.shutdown().await;
                                let mut rest = Vec::new();
                                let _ = tokio::time::timeout(
                                    Duration::from_secs(2),
                                    s.read_to_end(&mut rest),
                                )
                                .await;
                            }
                        }
                        Ok(None)
                    }
                },
            )
            .await;
        let e = got
            .err()
            .expect("an intercept proven through the tunnel was made");
        assert!(
            e.to_string().contains("no proof that you may port-forward"),
            "{e}"
        );
    });
    assert!(from_a_pod(&lab).contains("served by nginx"));
    assert!(
        sk_lookup_links_in(&web_a).is_empty(),
        "a program was attached"
    );
}

#[test]
fn the_agent_itself_and_the_node_are_never_intercept_targets() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("tt") else {
        return;
    };
    let agent_ns = format!("{}-tpbpf-system-tpbpf-agent-node1", lab.name);
    as_developer(&lab, |client| async move {
        let (session, _) = session(&client, "tpbpf-agent-node1").await;
        for (target, why) in [
            // The agent's own pod: its tunnel port.
            ("10.244.1.250:4391", "the agent's own addresses"),
            // The node, as a hostNetwork pod's address is: kubelet.
            ("172.31.0.11:10250", "the node's own addresses"),
            ("127.0.0.1:22", "loopback"),
        ] {
            // A client that could prove anything: the refusal comes first.
            let got = session
                .intercept(
                    target.parse().unwrap(),
                    InterceptMode::Steal,
                    Duration::from_secs(10),
                    |_, _| async { Ok(None) },
                )
                .await;
            let e = got
                .err()
                .unwrap_or_else(|| panic!("{target} was intercepted"))
                .to_string();
            assert!(
                e.contains("cannot be intercepted") && e.contains(why),
                "{target}: {e}"
            );
        }
    });
    assert!(
        sk_lookup_links_in(&agent_ns).is_empty(),
        "a program was attached"
    );
}

#[test]
fn each_token_opens_one_session_and_only_resumes_it() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("tk") else {
        return;
    };
    as_developer(&lab, |client| async move {
        let pod = "tpbpf-agent-node2";
        let a = tpbpf_kube::agent_credentials(&client, pod).await.unwrap();
        let b = tpbpf_kube::agent_credentials(&client, pod).await.unwrap();
        assert_ne!(a.token, b.token, "two sessions got the same token");
        let first = connect(&client, pod, &a, &a.token).await.unwrap();
        let again = connect(&client, pod, &a, &a.token).await;
        let e = again.err().expect("a used token opened a second session");
        assert!(e.contains("opened a session already"), "{e}");
        let forged = connect(&client, pod, &a, &"0".repeat(64)).await;
        assert!(forged
            .err()
            .expect("a forged token")
            .contains("unknown token"));
        // The second token still opens its own session; both work.
        let second = connect(&client, pod, &b, &b.token).await.unwrap();
        for s in [&first, &second] {
            let got = through(s, "10.96.0.20:80").await;
            assert!(got.is_ok_and(|b| b.contains("served by nginx")));
        }
    });
}

#[test]
fn an_intercept_stopped_during_its_access_check_is_never_attached() {
    if !require_root() {
        return;
    }
    // The proof here is a port-forward (the relaxed rule): it takes a new
    // connection through the API server, so it comes after the stop.
    let Some(lab) = LabGuard::up_without_agent("ts") else {
        return;
    };
    lab.install_with(&["--intercept-rights", "port-forward"]);
    let web_a = format!("{}-default-web-7d4b9c-a1", lab.name);
    let web_a2 = web_a.clone();
    let agent_log = format!("/run/tpbpf-lab/{}/agent-node1.log", lab.name);
    let agent_log2 = agent_log.clone();
    let checked_after_stop = move || {
        std::fs::read_to_string(&agent_log2)
            .unwrap_or_default()
            .contains("intercept stopped while it was being checked")
    };
    as_developer(&lab, move |client| async move {
        let (session, _) = session(&client, "tpbpf-agent-node1").await;
        let c2 = client.clone();
        // The proof is sent (through a real port-forward) only once the
        // client has given up: `intercept` has returned, its stop queued
        // on the tunnel, a frame on a connection already open, while the
        // proof needs a new port-forward through the API server.
        let (gave_up_tx, gave_up_rx) = tokio::sync::oneshot::channel::<()>();
        let gave_up_rx = std::sync::Mutex::new(Some(gave_up_rx));
        let (proof_tx, proof_rx) = tokio::sync::oneshot::channel();
        let proof_tx = std::sync::Mutex::new(Some(proof_tx));
        let got = session
            .intercept(
                "10.244.1.10:80".parse().unwrap(),
                InterceptMode::Steal,
                Duration::from_secs(10),
                move |port, nonce| {
                    let c2 = c2.clone();
                    let gave_up = gave_up_rx.lock().unwrap().take();
                    let proved = proof_tx.lock().unwrap().take();
                    tokio::spawn(async move {
                        if let Some(gave_up) = gave_up {
                            let _ = gave_up.await;
                        }
                        let r = tpbpf_kube::prove_port_forward(
                            &c2,
                            "default",
                            "web-7d4b9c-a1",
                            port,
                            nonce,
                        )
                        .await;
                        if let Some(proved) = proved {
                            let _ = proved.send(r);
                        }
                    });
                    async { Err("given up".to_string()) }
                },
            )
            .await;
        assert!(got.is_err());
        let _ = gave_up_tx.send(());
        tokio::time::timeout(Duration::from_secs(30), proof_rx)
            .await
            .expect("the proof was not sent in 30 s")
            .expect("the proof task ended without a word")
            .expect("the proof");
        // The check passes after the stop: the agent drops what it made
        // and says so. Until then an attachment could still come.
        let checked = tokio::task::spawn_blocking(move || {
            wait_for(Duration::from_secs(20), checked_after_stop)
        })
        .await
        .unwrap();
        // The session is still alive: its intercepts would stay.
        assert!(session.ended().is_none());
        assert!(
            sk_lookup_links_in(&web_a2).is_empty(),
            "attached after its stop"
        );
        assert!(checked, "the agent never finished the check it was racing");
    });
    assert!(from_a_pod(&lab).contains("served by nginx"));
    // The proof did arrive, after the stop.
    let log = std::fs::read_to_string(&agent_log).unwrap_or_default();
    assert!(
        log.contains("intercept stopped while it was being checked"),
        "the race was not exercised:\n{log}"
    );
}
