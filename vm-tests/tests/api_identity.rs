//! The lab's API server over HTTPS with the identities real clusters give:
//! a kubeconfig whose CA is another cluster's, an expired client
//! certificate, one from another CA and an unknown token are each refused,
//! and `tpbpf up` / `install` say so in one line naming the kubeconfig, the
//! context and the fix; the exec credential plugin's identity brings a
//! bridge up, and the plugin really ran.
use std::{
    path::PathBuf,
    process::{Command, Output},
    time::{Duration, SystemTime},
};

use serde_json::Value;
use tpbpf_lab::{identity, kubeconfig::Credential, pki, Lab};
use tpbpf_vm_tests::*;

/// A kubeconfig written for one test, removed on drop.
struct TempKubeconfig(PathBuf);

impl TempKubeconfig {
    fn new(text: &str) -> Self {
        let path = std::env::temp_dir().join(unique_name("tpbpf-kubeconfig"));
        std::fs::write(&path, text).unwrap();
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempKubeconfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `tpbpf --netns DEV <args> --kubeconfig K`, in the developer namespace.
fn tpbpf_in(lab: &LabGuard, args: &[&str], kubeconfig: &str) -> Output {
    Command::new(tpbpf_bin())
        .args(["--netns", &lab.dev_netns()])
        .args(args)
        .args(["--kubeconfig", kubeconfig])
        .output()
        .unwrap()
}

/// The one `tpbpf: error:` line of a failed command (and that it is one).
fn the_error_line(out: &Output) -> String {
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("tpbpf: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line expected:\n{stderr}");
    errors[0].to_string()
}

fn assert_names_all(line: &str, wanted: &[&str]) {
    for w in wanted {
        assert!(line.contains(w), "`{w}` missing from:\n{line}");
    }
}

#[test]
fn a_kubeconfig_with_another_clusters_ca_makes_up_and_install_say_so_in_one_line() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up_without_agent("tw") else {
        return;
    };
    let l = Lab::new(&lab.name);
    let (other_ca, _) = pki::foreign_ca("someone").unwrap();
    let now = SystemTime::now();
    let admin = l
        .pki()
        .issue_client(
            identity::ADMIN_USER,
            &[identity::ADMIN_GROUP],
            now,
            now + Duration::from_secs(3600),
        )
        .unwrap();
    let kc = TempKubeconfig::new(&tpbpf_lab::kubeconfig::render(
        &tpbpf_lab::kubeconfig::Spec {
            server: &tpbpf_lab::api_url(),
            ca_pem: &other_ca,
            cluster: &lab.name,
            user: identity::ADMIN_USER,
            credential: Credential::ClientCert(&admin),
        },
    ));
    let instance = Instance(unique_name("wca"));
    for args in [
        &["up", "--instance", &instance.0][..],
        &["install", "--dry-run"][..],
    ] {
        let line = the_error_line(&tpbpf_in(&lab, args, kc.path()));
        assert_names_all(
            &line,
            &[
                "the API server's certificate is not signed by the kubeconfig's certificate-authority",
                kc.path(),
                &format!("context {}", lab.name),
                &format!("check certificate-authority-data for cluster {}", lab.name),
                "kubectl",
            ],
        );
    }
    // The same kubeconfig with the lab's own CA works.
    let good = TempKubeconfig::new(
        &l.kubeconfig_for(identity::ADMIN_USER, Credential::ClientCert(&admin))
            .unwrap(),
    );
    let out = tpbpf_in(&lab, &["install", "--dry-run"], good.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_expired_or_foreign_client_certificate_and_an_unknown_token_are_refused_in_one_line() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up_without_agent("tx") else {
        return;
    };
    let l = Lab::new(&lab.name);
    let day = Duration::from_secs(86400);
    let now = SystemTime::now();
    let expired = l
        .pki()
        .issue_client(
            identity::ADMIN_USER,
            &[identity::ADMIN_GROUP],
            now - 2 * day,
            now - day,
        )
        .unwrap();
    let (_, forged) = pki::foreign_ca(identity::ADMIN_USER).unwrap();
    let instance = Instance(unique_name("xc"));
    let api_log = || std::fs::read_to_string(lab.state_dir().join("api.log")).unwrap();
    let refused_before = api_log().matches("TLS handshake refused").count();

    let kc = TempKubeconfig::new(
        &l.kubeconfig_for(identity::ADMIN_USER, Credential::ClientCert(&expired))
            .unwrap(),
    );
    let line = the_error_line(&tpbpf_in(
        &lab,
        &["up", "--instance", &instance.0],
        kc.path(),
    ));
    assert_names_all(
        &line,
        &[
            "the API server refused the client certificate of user kubernetes-admin: certificate expired",
            kc.path(),
            &format!("context {}", lab.name),
            "client-certificate-data for user kubernetes-admin",
        ],
    );

    let kc = TempKubeconfig::new(
        &l.kubeconfig_for(identity::ADMIN_USER, Credential::ClientCert(&forged))
            .unwrap(),
    );
    let line = the_error_line(&tpbpf_in(
        &lab,
        &["up", "--instance", &instance.0],
        kc.path(),
    ));
    assert_names_all(
        &line,
        &[
            "the API server refused the client certificate of user kubernetes-admin",
            "the cluster's CA did not issue it",
            kc.path(),
            "check client-certificate-data and client-key-data for user kubernetes-admin",
        ],
    );
    // Both were refused in the handshake, not by a request's answer.
    assert!(
        wait_for(Duration::from_secs(2), || api_log()
            .matches("TLS handshake refused")
            .count()
            >= refused_before + 2),
        "{}",
        api_log()
    );

    let kc = TempKubeconfig::new(
        &l.kubeconfig_for(
            identity::DEVELOPER_USER,
            Credential::Token("lab-not-a-token"),
        )
        .unwrap(),
    );
    let line = the_error_line(&tpbpf_in(
        &lab,
        &["up", "--instance", &instance.0],
        kc.path(),
    ));
    assert_names_all(
        &line,
        &[
            "401 Unauthorized",
            "user lab-developer",
            kc.path(),
            &format!("context {}", lab.name),
            "auth whoami",
        ],
    );
}

#[test]
fn the_exec_plugin_identity_brings_a_bridge_up_and_the_plugin_runs_once_per_up() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("te") else {
        return;
    };
    let (kubeconfig, dev) = (lab.exec_kubeconfig(), lab.dev_netns());
    assert!(
        std::fs::read_to_string(&kubeconfig)
            .unwrap()
            .contains("client.authentication.k8s.io/v1"),
        "{kubeconfig} has no exec user"
    );
    let calls_file = lab.state_dir().join("exec-credential.calls");
    let calls = || {
        std::fs::read_to_string(&calls_file)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let before = calls();
    let cg = TestCgroup::new();
    let instance = Instance(unique_name("ex"));
    let out = Command::new(tpbpf_bin())
        .args([
            "--netns",
            &dev,
            "up",
            "-o",
            "json",
            "--kubeconfig",
            &kubeconfig,
        ])
        .args(["--instance", &instance.0, "--cgroup"])
        .arg(cg.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(state["agent"]["healthy"], true, "{state}");
    // One process holds the kubeconfig (the bridge's user's side), with one
    // kube client for discovery, the agent's lookup, the tunnel and the
    // intercepts: a plugin that takes seconds (aws, gcloud, kubelogin) runs
    // once per `tpbpf up`.
    assert_eq!(
        calls() - before,
        1,
        "the exec credential plugin ran {} times for one tpbpf up",
        calls() - before
    );

    // Through the tunnel, which port-forwards as that identity.
    let resolv = std::env::temp_dir().join(format!("{}.resolv.conf", lab.name));
    std::fs::write(&resolv, "nameserver 127.0.0.53\n").unwrap();
    let got = bridged_shell(
        cg.path(),
        &dev,
        &resolv,
        "curl -sS -m 5 http://web.default/",
    )
    .output()
    .unwrap();
    let _ = std::fs::remove_file(&resolv);
    let page = String::from_utf8_lossy(&got.stdout);
    assert!(
        page.contains("served by nginx"),
        "{page}{}",
        String::from_utf8_lossy(&got.stderr)
    );
    // The tunnel's port-forwards and `tpbpf list` (through the bridge's
    // control socket) ask for no new token.
    let list = Command::new(tpbpf_bin())
        .args(["--netns", &dev, "list", "--instance", &instance.0])
        .output()
        .unwrap();
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    assert_eq!(calls() - before, 1, "the plugin ran again after up");

    // kubectl takes it for the same user.
    if let Ok(out) = Command::new("ip")
        .args([
            "netns",
            "exec",
            &dev,
            "kubectl",
            "--kubeconfig",
            &kubeconfig,
        ])
        .args(["auth", "whoami", "-o", "json"])
        .output()
    {
        let who: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
        assert_eq!(
            who["status"]["userInfo"]["username"],
            identity::EXEC_USER,
            "{who}"
        );
    }
}
