//! The lab's API server answers reviews as kube-apiserver does, from the
//! same rules it applies to requests: `kubectl auth can-i` for each of its
//! identities, a `TokenReview` of the agent's token, and a
//! `SubjectAccessReview` about another user, each allowed only to those
//! RBAC lets create them.
use std::process::{Command, Output};

use serde_json::Value;
use tpbpf_lab::Lab;
use tpbpf_vm_tests::*;

fn kubectl(lab: &LabGuard, kubeconfig: &str, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.dev_netns(),
            "kubectl",
            "--kubeconfig",
            kubeconfig,
        ])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn can_i(lab: &LabGuard, kubeconfig: &str, args: &[&str]) -> bool {
    let mut all = vec!["auth", "can-i"];
    all.extend_from_slice(args);
    let out = kubectl(lab, kubeconfig, &all, None);
    // "yes", or "no" and the reason.
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        said == "yes" || said.starts_with("no"),
        "kubectl auth can-i {args:?}: {said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    said == "yes"
}

#[test]
fn the_lab_answers_token_and_access_reviews_as_its_rbac_decides() {
    if !require_root() {
        return;
    }
    if Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_err()
    {
        println!("SKIP: kubectl is not installed (sudo bash xtask/setup.sh installs it)");
        return;
    }
    let Some(lab) = LabGuard::up_without_agent("rv") else {
        return;
    };
    let l = Lab::new(&lab.name);
    let forwarder = l.forwarder_kubeconfig_path().display().to_string();
    let developer = lab.restricted_kubeconfig();
    let admin = lab.kubeconfig();

    // Port-forward alone, for the forwarder; patch and exec as well for the
    // developer; and neither outside the lab's restricted namespaces.
    assert!(can_i(
        &lab,
        &forwarder,
        &[
            "create",
            "pods",
            "--subresource",
            "portforward",
            "-n",
            "default"
        ]
    ));
    assert!(!can_i(
        &lab,
        &forwarder,
        &["patch", "pods", "-n", "default"]
    ));
    assert!(!can_i(
        &lab,
        &forwarder,
        &["create", "pods", "--subresource", "exec", "-n", "default"]
    ));
    assert!(can_i(&lab, &developer, &["patch", "pods", "-n", "default"]));
    assert!(can_i(
        &lab,
        &developer,
        &["create", "pods", "--subresource", "exec", "-n", "default"]
    ));
    assert!(!can_i(&lab, &developer, &["patch", "pods", "-n", "cache"]));
    assert!(!can_i(
        &lab,
        &developer,
        &["get", "secrets", "-n", "default"]
    ));
    assert!(can_i(&lab, &admin, &["get", "secrets", "-n", "default"]));

    // A TokenReview of the agent's token, by the admin: who it stands for.
    let token = std::fs::read_to_string(l.agent_token_path()).unwrap();
    let review = format!(
        r#"{{"apiVersion":"authentication.k8s.io/v1","kind":"TokenReview","spec":{{"token":"{token}"}}}}"#
    );
    let out = kubectl(
        &lab,
        &admin,
        &["create", "--validate=false", "-o", "json", "-f", "-"],
        Some(&review),
    );
    let answer: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(answer["status"]["authenticated"], true, "{answer}");
    assert_eq!(
        answer["status"]["user"]["username"], "system:serviceaccount:tpbpf-system:tpbpf-agent",
        "{answer}"
    );
    // An unknown token is not authenticated.
    let out = kubectl(
        &lab,
        &admin,
        &["create", "--validate=false", "-o", "json", "-f", "-"],
        Some(&review.replace(token.trim(), "not-a-token")),
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["status"]["authenticated"], false, "{answer}");
    // The forwarder may not review tokens.
    let out = kubectl(
        &lab,
        &forwarder,
        &["create", "--validate=false", "-o", "json", "-f", "-"],
        Some(&review),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot create resource \"tokenreviews\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A SubjectAccessReview about the forwarder, by the admin.
    let sar = |verb: &str, sub: &str| {
        format!(
            r#"{{"apiVersion":"authorization.k8s.io/v1","kind":"SubjectAccessReview","spec":{{"user":"lab-forwarder","resourceAttributes":{{"namespace":"default","verb":"{verb}","resource":"pods","subresource":"{sub}","name":"web-7d4b9c-a1"}}}}}}"#
        )
    };
    for (verb, sub, allowed) in [("create", "portforward", true), ("patch", "", false)] {
        let out = kubectl(
            &lab,
            &admin,
            &["create", "--validate=false", "-o", "json", "-f", "-"],
            Some(&sar(verb, sub)),
        );
        let answer: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
        assert_eq!(
            answer["status"]["allowed"], allowed,
            "{verb} {sub}: {answer}"
        );
    }
}
