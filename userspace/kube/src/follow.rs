//! Following objects as they come and go, through a list and a watch: a
//! workload's pods (for an intercept), the cluster's namespaces (for DNS).
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    api::{ListParams, WatchParams},
    Api, Client,
};
use tracing::debug;

use crate::{interceptable, Workload, WorkloadPod};

/// How long a watch runs before it is made again (the API server ends
/// watches after at most its own timeout anyway).
const WATCH_TIMEOUT_S: u32 = 290;

/// Keeps the objects `api` lists (by name) current: a list, then a watch
/// from its resource version, and a fresh list after every watch ends or
/// fails (a second apart). `publish` sees the objects after each change, or
/// the error of a round that failed. Runs until the caller drops it.
async fn list_and_watch<K>(
    api: Api<K>,
    lp: ListParams,
    wp: WatchParams,
    mut publish: impl FnMut(Result<&BTreeMap<String, K>, String>),
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    use futures_util::StreamExt;
    use kube::api::WatchEvent;
    loop {
        let mut seen: BTreeMap<String, K> = BTreeMap::new();
        let round = async {
            let list = api.list(&lp).await.map_err(|e| e.to_string())?;
            let rv = list.metadata.resource_version.clone().unwrap_or_default();
            seen = list
                .items
                .into_iter()
                .filter_map(|o| Some((o.meta().name.clone()?, o)))
                .collect();
            publish(Ok(&seen));
            let mut events = api
                .watch(&wp, &rv)
                .await
                .map_err(|e| e.to_string())?
                .boxed();
            while let Some(ev) = events.next().await {
                match ev.map_err(|e| e.to_string())? {
                    WatchEvent::Added(o) | WatchEvent::Modified(o) => {
                        if let Some(n) = o.meta().name.clone() {
                            seen.insert(n, o);
                        }
                    }
                    WatchEvent::Deleted(o) => {
                        if let Some(n) = &o.meta().name {
                            seen.remove(n);
                        }
                    }
                    WatchEvent::Bookmark(_) => continue,
                    WatchEvent::Error(e) => return Err(e.to_string()),
                }
                publish(Ok(&seen));
            }
            Ok::<(), String>(())
        };
        if let Err(e) = round.await {
            publish(Err(e));
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }
}

/// Follows `w`'s pods as they come and go: the receiver holds the pods an
/// intercept takes now, updated on every change a watch reports (and on a
/// fresh list after every watch ends or fails). The task ends when the
/// receiver is dropped.
pub fn follow(client: &Client, w: Workload) -> tokio::sync::watch::Receiver<Vec<WorkloadPod>> {
    let (tx, rx) = tokio::sync::watch::channel(Vec::<WorkloadPod>::new());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &w.namespace);
    tokio::spawn(async move {
        let name = w.name.clone();
        let watching = list_and_watch(pods, w.list_params(), w.watch_params(), |seen| match seen {
            Err(e) => debug!(workload = name, "watching its pods: {e}; listing again"),
            Ok(seen) => {
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
            }
        });
        tokio::select! {
            _ = watching => {}
            _ = tx.closed() => {}
        }
    });
    rx
}

/// The cluster's namespaces as this identity may list them, or why it may
/// not (the last round's error; the set it had before is kept meanwhile).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespaces {
    pub names: BTreeSet<String>,
    pub error: Option<String>,
}

/// Follows the cluster's namespaces: the receiver holds every namespace the
/// identity may list, updated on each change a watch reports, and listed
/// again after errors. The task ends when the receiver is dropped.
pub fn follow_namespaces(client: &Client) -> tokio::sync::watch::Receiver<Namespaces> {
    let (tx, rx) = tokio::sync::watch::channel(Namespaces::default());
    let api: Api<Namespace> = Api::all(client.clone());
    tokio::spawn(async move {
        let watching = list_and_watch(
            api,
            ListParams::default(),
            WatchParams::default().timeout(WATCH_TIMEOUT_S),
            |seen| {
                tx.send_if_modified(|old| {
                    let mut now = old.clone();
                    match seen {
                        Ok(seen) => {
                            now.names = seen.keys().cloned().collect();
                            now.error = None;
                        }
                        Err(e) => now.error = Some(e),
                    }
                    let changed = now != *old;
                    *old = now;
                    changed
                });
            },
        );
        tokio::select! {
            _ = watching => {}
            _ = tx.closed() => {}
        }
    });
    rx
}
