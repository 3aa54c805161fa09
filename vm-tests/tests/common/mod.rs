//! Set-up shared by the vm-tests that talk to the lab with tpbpf's own
//! client code.
use std::future::Future;

use tpbpf_vm_tests::{enter_netns, LabGuard};

/// Runs `f` with a kube client for the lab's admin kubeconfig, on a thread
/// inside the developer machine's namespace (the only one that reaches the
/// API), and returns what it returns.
pub fn with_admin_client<F, Fut, T>(lab: &LabGuard, f: F) -> T
where
    F: FnOnce(kube::Client) -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let (dev, kubeconfig) = (lab.dev_netns(), lab.kubeconfig());
    std::thread::spawn(move || {
        enter_netns(&dev).expect("entering the developer namespace");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (client, ..) = tpbpf_kube::client(Some(std::path::Path::new(&kubeconfig)), None)
                .await
                .expect("a client for the lab");
            f(client).await
        })
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}
