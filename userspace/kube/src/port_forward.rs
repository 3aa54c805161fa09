//! Port-forwards through the API server: the tunnel's transport to an
//! agent, and the proof that this identity may port-forward into a pod.
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};

use crate::AGENT_NAMESPACE;

/// Proves to an agent that this identity may port-forward into pod
/// `namespace/pod`: port-forwards to the pod's `port` through the API
/// server (which checks `pods/portforward`) and sends `nonce` there.
pub async fn prove_port_forward(
    client: &Client,
    namespace: &str,
    pod: &str,
    port: u16,
    nonce: [u8; 16],
) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut pf = pods.portforward(pod, &[port]).await.map_err(|e| {
        format!(
            "your Kubernetes identity may not port-forward into pod {namespace}/{pod}, which an intercept needs: {e}"
        )
    })?;
    let mut stream = pf
        .take_stream(port)
        .ok_or("the port-forward gave no stream")?;
    stream
        .write_all(&nonce)
        .await
        .map_err(|e| format!("port-forward to {namespace}/{pod}: {e}"))?;
    stream
        .shutdown()
        .await
        .map_err(|e| format!("port-forward to {namespace}/{pod}: {e}"))?;
    // The agent closes once it has the nonce.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut rest),
    )
    .await;
    Ok(())
}

/// A tunnel transport through the API server: every connection is a new
/// port-forward to the agent pod's tunnel port.
pub struct PortForward {
    pods: Api<Pod>,
    pod: String,
    port: u16,
}

impl PortForward {
    pub fn new(client: &Client, pod: &str, port: u16) -> PortForward {
        PortForward {
            pods: Api::namespaced(client.clone(), AGENT_NAMESPACE),
            pod: pod.to_string(),
            port,
        }
    }
}

impl tpbpf_mux::transport::Connector for PortForward {
    fn connect(&self) -> tpbpf_mux::transport::ConnectFuture<'_> {
        Box::pin(async move {
            let mut pf = self
                .pods
                .portforward(&self.pod, &[self.port])
                .await
                .map_err(|e| std::io::Error::other(format!("port-forward to {}: {e}", self.pod)))?;
            let stream = pf
                .take_stream(self.port)
                .ok_or_else(|| std::io::Error::other("port-forward gave no stream"))?;
            Ok(Box::new(stream) as tpbpf_mux::transport::BoxIo)
        })
    }

    fn describe(&self) -> String {
        format!(
            "port-forward to {AGENT_NAMESPACE}/{}:{}",
            self.pod, self.port
        )
    }
}
