//! Following a workload's pods as they come and go, through a watch.
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};
use tracing::debug;

use crate::{interceptable, Workload, WorkloadPod};

/// Follows `w`'s pods as they come and go: the receiver holds the pods an
/// intercept takes now, updated on every change a watch reports (and on a
/// fresh list after every watch ends or fails). The task ends when the
/// receiver is dropped.
pub fn follow(client: &Client, w: Workload) -> tokio::sync::watch::Receiver<Vec<WorkloadPod>> {
    use futures_util::StreamExt;
    use kube::api::WatchEvent;
    let (tx, rx) = tokio::sync::watch::channel(Vec::<WorkloadPod>::new());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &w.namespace);
    tokio::spawn(async move {
        let publish = |seen: &std::collections::BTreeMap<String, Pod>| {
            let now: Vec<WorkloadPod> = seen.values().filter_map(interceptable).collect();
            tx.send_if_modified(|old| {
                let same = old.len() == now.len()
                    && old
                        .iter()
                        .zip(&now)
                        .all(|(a, b)| a.name == b.name && a.ip == b.ip && a.node == b.node);
                if !same {
                    old.clone_from(&now);
                }
                !same
            });
        };
        loop {
            let round = async {
                let list = pods
                    .list(&w.list_params())
                    .await
                    .map_err(|e| e.to_string())?;
                let mut seen: std::collections::BTreeMap<String, Pod> = list
                    .items
                    .into_iter()
                    .filter_map(|p| Some((p.metadata.name.clone()?, p)))
                    .collect();
                publish(&seen);
                let rv = list.metadata.resource_version.unwrap_or_default();
                let mut events = pods
                    .watch(&w.watch_params(), &rv)
                    .await
                    .map_err(|e| e.to_string())?
                    .boxed();
                while let Some(ev) = events.next().await {
                    match ev.map_err(|e| e.to_string())? {
                        WatchEvent::Added(p) | WatchEvent::Modified(p) => {
                            if let Some(n) = p.metadata.name.clone() {
                                seen.insert(n, p);
                            }
                        }
                        WatchEvent::Deleted(p) => {
                            if let Some(n) = &p.metadata.name {
                                seen.remove(n);
                            }
                        }
                        WatchEvent::Bookmark(_) => {}
                        WatchEvent::Error(e) => return Err(e.to_string()),
                    }
                    publish(&seen);
                }
                Ok::<(), String>(())
            };
            tokio::select! {
                r = round => {
                    if let Err(e) = r {
                        debug!(workload = w.name, "watching its pods: {e}; listing again");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
                _ = tx.closed() => return,
            }
        }
    });
    rx
}
