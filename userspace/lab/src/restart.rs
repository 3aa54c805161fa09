//! The lab's pods as they are now: the spec's, with the replacements
//! `lab restart` made (new names and addresses), one writer at a time.
use std::{
    collections::BTreeMap,
    fs, io,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::Serialize;
use tracing::info;

use crate::{
    netns::{ip, netns_del, nft},
    process::{random_u64, write},
    spec::{self, Pod},
    Lab, LabError, Result,
};

/// A pod `restart_pod` replaced: who it is now.
#[derive(Debug, Serialize, serde::Deserialize)]
struct Replaced {
    name: String,
    ip: String,
    generation: u32,
}

impl Lab {
    fn replaced_path(&self) -> PathBuf {
        self.state.join("replaced.json")
    }

    /// Pods `tpbpf lab restart` replaced, by their place in the spec.
    fn replaced(&self) -> BTreeMap<usize, Replaced> {
        fs::read(self.replaced_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// The lab's pods as they are now: the spec's, with the name and address
    /// of each replacement `restart_pod` made.
    pub fn pods(&self) -> Vec<Pod> {
        let replaced = self.replaced();
        spec::pods()
            .into_iter()
            .enumerate()
            .map(|(i, mut p)| {
                if let Some(r) = replaced.get(&i) {
                    p.name.clone_from(&r.name);
                    p.ip.clone_from(&r.ip);
                }
                p
            })
            .collect()
    }

    /// The node-side veth of the pod at place `i`, replacement `generation`.
    pub(crate) fn host_if(i: usize, generation: u32) -> String {
        if generation == 0 {
            format!("vp{i}")
        } else {
            format!("vp{i}r{generation}")
        }
    }

    /// Replaces a pod as its controller would after a delete: the old one's
    /// processes stop and its network goes (the CNI removes the veth); a new
    /// pod starts on the same node with a new address, and a new name unless
    /// it is a StatefulSet's (`name-N`). Services follow it. Returns the new
    /// pod.
    pub fn restart_pod(&self, namespace: Option<&str>, name: &str) -> Result<Pod> {
        let _lock = self.lock()?;
        let pods = self.pods();
        let Some((i, old)) = pods
            .iter()
            .enumerate()
            .find(|(_, p)| p.name == name && namespace.is_none_or(|n| n == p.namespace))
        else {
            return Err(LabError::NotReady(format!(
                "no pod {name} in lab {} (`tpbpf lab status` lists them)",
                self.name
            )));
        };
        let mut replaced = self.replaced();
        let generation = replaced.get(&i).map_or(0, |r| r.generation);
        self.stop_pod(old);
        let _ = ip(&[
            "-n",
            &self.node_netns(old.node),
            "link",
            "del",
            &Self::host_if(i, generation),
        ]);
        netns_del(&self.pod_netns(old));
        let _ = fs::remove_dir_all(self.pod_dir(old));

        let stateful = old
            .name
            .strip_prefix(old.workload)
            .and_then(|r| r.strip_prefix('-'))
            .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()));
        let new_name = if stateful {
            old.name.clone()
        } else {
            let prefix = old.name.rsplit_once('-').map_or(old.name.as_str(), |p| p.0);
            // The alphabet of Kubernetes' generated names.
            let alphabet = b"bcdfghjklmnpqrstvwxz2456789";
            let mut x = random_u64();
            let suffix: String = (0..5)
                .map(|_| {
                    let c = alphabet[(x % alphabet.len() as u64) as usize] as char;
                    x /= alphabet.len() as u64;
                    c
                })
                .collect();
            format!("{prefix}-{suffix}")
        };
        let node = spec::nodes()
            .into_iter()
            .find(|n| n.name == old.node)
            .ok_or_else(|| LabError::NotReady(format!("no node {}", old.node)))?;
        let base = node.pod_cidr.trim_end_matches("0/24");
        let new_ip = (100..250)
            .map(|n| format!("{base}{n}"))
            .find(|a| !pods.iter().any(|p| &p.ip == a))
            .ok_or_else(|| LabError::NotReady(format!("no free address on {}", node.name)))?;
        replaced.insert(
            i,
            Replaced {
                name: new_name,
                ip: new_ip,
                generation: generation + 1,
            },
        );
        write(
            &self.replaced_path(),
            &serde_json::to_string(&replaced).unwrap_or_default(),
        )?;
        let new = self.pods().swap_remove(i);
        self.pod_network(
            &self.pod_netns(&new),
            new.node,
            &new.ip,
            &Self::host_if(i, generation + 1),
        )?;
        let rules = format!("flush table ip tpbpf_lab\n{}", self.service_rules());
        for n in spec::nodes() {
            nft(&self.node_netns(n.name), &rules)?;
        }
        self.start_app(&new)?;
        self.wait_pod(&new, Instant::now() + Duration::from_secs(30))?;
        info!(
            lab = self.name,
            old = name,
            new = new.name,
            ip = new.ip,
            "pod replaced"
        );
        Ok(new)
    }

    /// One writer of the lab's pods at a time.
    fn lock(&self) -> Result<fs::File> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.state.join("pods.lock"))
            .map_err(|source| LabError::Io {
                what: format!(
                    "opening {}/pods.lock (is the lab up?)",
                    self.state.display()
                ),
                source,
            })?;
        // SAFETY: flock on an fd this function owns; released when it closes.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) } != 0 {
            return Err(LabError::Io {
                what: "locking the lab's pods".into(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(f)
    }
}
