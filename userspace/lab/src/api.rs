//! The lab's API endpoint: its process, the cluster CA and certificates,
//! the static tokens, the exec credential plugin, and a kubeconfig for
//! each identity.
use std::{fs, path::PathBuf, process::Command};

use crate::{
    api_url, identity, kubeconfig, pki,
    process::{random_u64, spawn_detached, write},
    Lab, LabError, Result, API_ADDR, RESTRICTED_NAMESPACES,
};

impl Lab {
    /// The admin's kubeconfig (client certificate).
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.state.join("kubeconfig")
    }

    /// The restricted developer's kubeconfig (bearer token).
    pub fn restricted_kubeconfig_path(&self) -> PathBuf {
        self.state.join("kubeconfig-restricted")
    }

    /// The kubeconfig of [`identity::FORWARDER_USER`] (a token): only
    /// `pods/portforward` and a bridge's reads.
    pub fn forwarder_kubeconfig_path(&self) -> PathBuf {
        self.state.join("kubeconfig-forwarder")
    }

    /// What a kubelet mounts at `/var/run/secrets/kubernetes.io/serviceaccount`
    /// in the agent's pod: its service account's `token`, `ca.crt` and
    /// `namespace`.
    pub fn agent_service_account_dir(&self) -> PathBuf {
        self.state.join("agent-serviceaccount")
    }

    /// The agent's service-account token.
    pub fn agent_token_path(&self) -> PathBuf {
        self.agent_service_account_dir().join("token")
    }

    /// The kubeconfig whose user runs [`Self::exec_plugin_path`].
    pub fn exec_kubeconfig_path(&self) -> PathBuf {
        self.state.join("kubeconfig-exec")
    }

    /// The exec credential plugin: prints an ExecCredential with the exec
    /// identity's token, and appends a line to
    /// [`Self::exec_plugin_calls_path`] each time it runs.
    pub fn exec_plugin_path(&self) -> PathBuf {
        self.state.join("exec-credential")
    }

    pub fn exec_plugin_calls_path(&self) -> PathBuf {
        self.state.join("exec-credential.calls")
    }

    /// The API server's static tokens (kube-apiserver's
    /// `--token-auth-file` format: `token,user,uid,"group1,group2"`).
    pub fn tokens_path(&self) -> PathBuf {
        self.state.join("tokens.csv")
    }

    /// The cluster CA and the certificates it issued.
    pub fn pki(&self) -> pki::Pki {
        pki::Pki::new(self.state.join("pki"))
    }

    /// A kubeconfig for the lab's API server (its address and CA) with
    /// `credential` as user `user`.
    pub fn kubeconfig_for(
        &self,
        user: &str,
        credential: kubeconfig::Credential<'_>,
    ) -> Result<String> {
        let ca = self.pki().ca_pem()?;
        Ok(kubeconfig::render(&kubeconfig::Spec {
            server: &api_url(),
            ca_pem: &ca,
            cluster: &self.name,
            user,
            credential,
        }))
    }

    pub(crate) fn api_pid(&self) -> Option<i32> {
        fs::read_to_string(self.state.join("api.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub(crate) fn start_api(&self) -> Result<()> {
        let Some(argv) = &self.api_command else {
            return Ok(());
        };
        use identity::*;
        let api_ip = API_ADDR
            .split(':')
            .next()
            .and_then(|ip| ip.parse().ok())
            .ok_or_else(|| LabError::NotReady(format!("{API_ADDR} is not an address")))?;
        let pki = self.pki();
        let admin = pki.create(api_ip, ADMIN_USER, ADMIN_GROUP)?;
        let restricted = format!("lab-dev-{:016x}{:016x}", random_u64(), random_u64());
        let exec = format!("lab-sso-{:016x}{:016x}", random_u64(), random_u64());
        let forwarder = format!("lab-fwd-{:016x}{:016x}", random_u64(), random_u64());
        let agent = format!("lab-sa-{:016x}{:016x}", random_u64(), random_u64());
        let agent_user = format!(
            "system:serviceaccount:{}:{}",
            tpbpf_agent_api::NAMESPACE,
            tpbpf_agent_api::DAEMONSET
        );
        let agent_groups = format!(
            "system:serviceaccounts,system:serviceaccounts:{}",
            tpbpf_agent_api::NAMESPACE
        );
        pki::write_private(
            &self.tokens_path(),
            &format!(
                "{restricted},{DEVELOPER_USER},{DEVELOPER_USER}\n{exec},{EXEC_USER},{EXEC_USER},\"{ADMIN_GROUP}\"\n{forwarder},{FORWARDER_USER},{FORWARDER_USER}\n{agent},{agent_user},{agent_user},\"{agent_groups}\"\n"
            ),
        )?;
        crate::process::mkdir(&self.agent_service_account_dir())?;
        pki::write_private(&self.agent_token_path(), &agent)?;
        let ca = fs::read_to_string(pki.ca_cert())
            .map_err(|e| LabError::NotReady(format!("reading {}: {e}", pki.ca_cert().display())))?;
        write(&self.agent_service_account_dir().join("ca.crt"), &ca)?;
        write(
            &self.agent_service_account_dir().join("namespace"),
            tpbpf_agent_api::NAMESPACE,
        )?;
        // Owner-only, as the credential it prints.
        pki::write_with_mode(
            &self.exec_plugin_path(),
            &format!(
                "#!/bin/sh\n# The lab's exec credential plugin (as `aws eks get-token`): one\n# ExecCredential with the token of user {EXEC_USER}, valid for 15 minutes.\necho \"$(date +%s) uid=$(id -u)\" >> {calls} 2>/dev/null\nexp=$(date -u -d @$(( $(date +%s) + 900 )) +%Y-%m-%dT%H:%M:%SZ)\nprintf '%s\\n' '{{\"apiVersion\":\"client.authentication.k8s.io/v1\",\"kind\":\"ExecCredential\",\"status\":{{\"token\":\"{exec}\",\"expirationTimestamp\":\"'\"$exp\"'\"}}}}'\n",
                calls = self.exec_plugin_calls_path().display(),
            ),
            0o700,
        )?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .args(["--listen", API_ADDR])
            .arg("--tls-cert-file")
            .arg(pki.server_cert())
            .arg("--tls-private-key-file")
            .arg(pki.server_key())
            .arg("--client-ca-file")
            .arg(pki.ca_cert())
            .arg("--token-auth-file")
            .arg(self.tokens_path())
            .args(["--restricted-namespaces", RESTRICTED_NAMESPACES]);
        let pid = spawn_detached(
            &mut cmd,
            &self.state.join("api.log"),
            &format!("the lab API endpoint ({})", argv[0]),
        )?;
        write(&self.state.join("api.pid"), &pid.to_string())?;
        // Each holds a credential: owner-only, as kubeadm's admin.conf.
        let plugin = self.exec_plugin_path();
        for (path, user, credential) in [
            (
                self.kubeconfig_path(),
                ADMIN_USER,
                kubeconfig::Credential::ClientCert(&admin),
            ),
            (
                self.restricted_kubeconfig_path(),
                DEVELOPER_USER,
                kubeconfig::Credential::Token(&restricted),
            ),
            (
                self.exec_kubeconfig_path(),
                EXEC_USER,
                kubeconfig::Credential::Exec(&plugin),
            ),
            (
                self.forwarder_kubeconfig_path(),
                FORWARDER_USER,
                kubeconfig::Credential::Token(&forwarder),
            ),
        ] {
            pki::write_private(&path, &self.kubeconfig_for(user, credential)?)?;
        }
        Ok(())
    }
}
