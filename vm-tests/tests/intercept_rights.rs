//! An intercept takes the Kubernetes right it amounts to, checked by the
//! agent with the API server (a TokenReview of a token, the cluster's
//! client CA for a certificate, then SubjectAccessReviews): an identity
//! with only `pods/portforward` on the pod cannot intercept it (nor so
//! read its environment), nor can an unknown token or another CA's
//! certificate; the lab's developer (a token, with `patch` and `exec` on
//! pods) and its admin (a client certificate) can, and get the pod's
//! environment. Through the lab, whose agent asks the lab's API server.
mod common;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tpbpf_kube::identity::Identity;
use tpbpf_lab::{identity, pki, Lab};
use tpbpf_mux::{transport::TlsConnector, Client, Config, InterceptMode};
use tpbpf_vm_tests::*;

const POD: &str = "web-7d4b9c-a1";

/// The token of `user` in the lab's token file.
fn token_of(lab: &LabGuard, user: &str) -> String {
    let tokens = std::fs::read_to_string(lab.state_dir().join("tokens.csv")).unwrap();
    tokens
        .lines()
        .find_map(|l| {
            let mut f = l.split(',');
            let (t, u) = (f.next()?, f.next()?);
            (u == user).then(|| t.to_string())
        })
        .unwrap_or_else(|| panic!("no token for {user}"))
}

/// Tries to intercept pod `default/web-7d4b9c-a1` on node1, proving
/// `who`; the pod's environment on success, the agent's refusal else.
async fn intercept_as(session: &tpbpf_mux::Session, who: &Identity) -> Result<String, String> {
    let target: SocketAddr = "10.244.1.10:80".parse().unwrap();
    let who = who.clone();
    let h = session
        .intercept(
            target,
            InterceptMode::Steal,
            Duration::from_secs(30),
            move |port, nonce| {
                let who = who.clone();
                async move {
                    assert_eq!(
                        port, 0,
                        "the agent asked for a port-forward, not an identity"
                    );
                    who.proof(&nonce, "default", POD).map(Some)
                }
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    let env = h.info().to_string();
    drop(h);
    Ok(env)
}

/// Runs `f` with a session to node1's agent, opened with the admin's
/// kubeconfig (the tunnel is anyone's: the identity is what counts).
fn with_session<F, Fut, T>(lab: &LabGuard, f: F) -> T
where
    F: FnOnce(tpbpf_mux::Session) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    common::with_admin_client(lab, |client| async move {
        let pod = "tpbpf-agent-node1";
        let creds = tpbpf_kube::agent_credentials(&client, pod).await.unwrap();
        let pf = tpbpf_kube::PortForward::new(&client, pod, creds.tunnel_port);
        let tls = TlsConnector::over(Arc::new(pf), &creds.fingerprint).unwrap();
        let session = Client::connect(
            Arc::new(tls),
            creds.token.as_bytes().to_vec(),
            Config::default(),
        )
        .await
        .unwrap();
        let out = f(session.clone()).await;
        // Ended on purpose, so the agent drops the session's intercepts at
        // once instead of keeping them through its resume window.
        session
            .close_flushed("test over", Duration::from_secs(2))
            .await;
        out
    })
}

fn admin_identity(lab: &LabGuard) -> Identity {
    let now = SystemTime::now();
    let admin = Lab::new(&lab.name)
        .pki()
        .issue_client(
            identity::ADMIN_USER,
            &[identity::ADMIN_GROUP],
            now,
            now + Duration::from_secs(3600),
        )
        .unwrap();
    Identity::from_pem(admin.cert_pem.as_bytes(), admin.key_pem.as_bytes()).unwrap()
}

#[test]
fn with_patch_workload_the_right_to_change_the_pod_is_not_enough() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up_without_agent("tw") else {
        return;
    };
    lab.install_with(&["--intercept-rights", "patch-workload"]);
    let developer = Identity::Token(token_of(&lab, identity::DEVELOPER_USER));
    let admin = admin_identity(&lab);
    let (dev, adm) = with_session(&lab, move |session| async move {
        (
            intercept_as(&session, &developer).await,
            intercept_as(&session, &admin).await,
        )
    });
    // The pod's controller is ReplicaSet web-7d4b9c, whose is Deployment web.
    let e = dev.expect_err("the developer, who may patch the pod only, intercepted it");
    assert!(
        e.contains("lab-developer may not patch deployments default/web") && e.contains("workload"),
        "{e}"
    );
    adm.expect("the admin may patch the Deployment");
}

#[test]
fn only_an_identity_with_the_right_to_change_the_pod_intercepts_it() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("tr") else {
        return;
    };
    let (_, forged) = pki::foreign_ca(identity::ADMIN_USER).unwrap();
    let identities = [
        (
            "forwarder",
            Identity::Token(token_of(&lab, identity::FORWARDER_USER)),
        ),
        ("unknown", Identity::Token("lab-not-a-token".into())),
        (
            "forged",
            Identity::from_pem(forged.cert_pem.as_bytes(), forged.key_pem.as_bytes()).unwrap(),
        ),
        (
            "developer",
            Identity::Token(token_of(&lab, identity::DEVELOPER_USER)),
        ),
        ("admin", admin_identity(&lab)),
    ];
    let web_a = format!("{}-default-{POD}", lab.name);
    let results = with_session(&lab, move |session| async move {
        let mut results = Vec::new();
        for (name, who) in identities {
            results.push((name, intercept_as(&session, &who).await));
        }
        results
    });
    for (name, result) in &results {
        println!("{name}: {result:?}");
    }
    let refused = |name: &str, why: &str| {
        let (_, r) = results.iter().find(|(n, _)| *n == name).unwrap();
        let e = r
            .as_ref()
            .expect_err(&format!("{name} intercepted the pod"));
        assert!(e.contains(why), "{name}: `{why}` missing from: {e}");
    };
    refused(
        "forwarder",
        "lab-forwarder may not patch pods default/web-7d4b9c-a1",
    );
    refused("unknown", "does not know the session's token");
    refused("forged", "not the cluster's");
    for name in ["developer", "admin"] {
        let (_, r) = results.iter().find(|(n, _)| *n == name).unwrap();
        let env = r.as_ref().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            env.contains("PATH=") && !env.starts_with('#'),
            "{name}: the pod's environment was not given: {env}"
        );
    }
    // Nothing is left attached in the pod, and it serves itself.
    assert!(
        wait_for(Duration::from_secs(5), || sk_lookup_links_in(&web_a)
            .is_empty()),
        "a program is left in the pod"
    );
    assert!(
        curl_from(&format!("{}-cache-redis-0", lab.name), "http://10.96.0.20/")
            .contains("served by nginx")
    );
}
